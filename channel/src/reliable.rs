//! Reliability above any [`Transport`]: handshake, sequence numbers, cumulative
//! acknowledgements, go-back-N retransmission out of the primary's log buffer, duplicate and
//! reorder handling, fragmentation of large records, resumption after a reconnect.
//!
//! [`Sender`] and [`Receiver`] are single-threaded state machines driven by `poll()`: the
//! pollers of [`crate::poller`] call them in a loop on a pinned thread, and a caller that wants
//! to own the loop itself (a benchmark, a VMM thread with spare cycles) can call them directly.
//! They know nothing about the transport beyond the [`Transport`] trait, so every transport
//! (shm, TCP, io_uring, AF_XDP) shares this code unchanged.

use std::time::{Duration, Instant};

use ftvm_ringbuf::layout::RECORD_HEADER_LEN;
use ftvm_ringbuf::{ClaimError, Consumer, Producer};

use crate::error::{Refusal, TransportError};
use crate::frame::{
    self, Frame, FrameError, Goodbye, GoodbyeReason, Hello, Role, DATA_OVERHEAD, DIGEST_LEN,
};
use crate::stats::Stats;
use crate::transport::Transport;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// How long a poller with nothing to do lets a blocking transport wait for the peer.
const IDLE_WAIT: Duration = Duration::from_millis(1);
/// Idle polls between two clock reads.
const CLOCK_EVERY: u32 = 64;
/// Most frames timed for round-trip samples at once.
const MAX_TIMED: usize = 4096;
/// A poll that brought at least this many frame bytes is streaming: its ack waits for the
/// next poll (which either brings more, or nothing and then acks). Smaller deliveries — a
/// lone record waiting for its ack — are acknowledged at once.
const ACK_DEFER_MIN: usize = 16 << 10;
/// Most frame bytes received between two acks while streaming.
const ACK_EVERY: usize = 256 << 10;
/// Most bytes of frames the backup holds beyond a hole (waiting for the missing records).
const HOLD_MAX: usize = 4 << 20;
/// Upper bound of the retransmit timeout's back-off.
const MAX_RTO: Duration = Duration::from_millis(500);

/// Copies of a GOODBYE sent (a datagram transport may lose one; the peer acts on the first).
const GOODBYE_COPIES: usize = 3;
/// How long sending a GOODBYE may wait for room in the transport.
const GOODBYE_PATIENCE: Duration = Duration::from_secs(1);

/// Sends a GOODBYE ([`GOODBYE_COPIES`] copies) over `t` and flushes.
fn send_goodbye(
    t: &mut dyn Transport,
    generation: u64,
    reason: GoodbyeReason,
    text: &str,
) -> Result<(), TransportError> {
    let mut buf = Vec::with_capacity(frame::HEADER_LEN + 4 + text.len());
    frame::encode_goodbye(&mut buf, generation, reason, text);
    let deadline = Instant::now() + GOODBYE_PATIENCE;
    for _ in 0..GOODBYE_COPIES {
        send_now(t, &buf, deadline)?;
    }
    tracing::info!(%reason, text, "said goodbye to the peer");
    Ok(())
}

/// Refusal reason codes carried in REFUSE frames.
pub mod refuse {
    /// Protocol versions differ.
    pub const VERSION: u32 = 1;
    /// Replication generations differ.
    pub const GENERATION: u32 = 2;
    /// Pairing digests differ (different guest images).
    pub const DIGEST: u32 = 3;
    /// Sizes are incompatible (the backup cannot hold the primary's records).
    pub const SIZES: u32 = 4;
    /// The backup needs records the primary no longer has.
    pub const GAP: u32 = 5;
    /// The settings blobs disagree (version 4).
    pub const SETTINGS: u32 = 6;
}

/// The VMM's check of the peer's settings blob ([`Config::check_settings`]): `Ok` when both
/// sides agree, else the text naming every field that differs and both values.
#[derive(Clone)]
pub struct SettingsCheck(pub Arc<SettingsCheckFn>);

/// The function inside a [`SettingsCheck`]: the peer's blob → agreement or the refusal text.
pub type SettingsCheckFn = dyn Fn(&[u8]) -> Result<(), String> + Send + Sync;

/// The peer's HELLO and settings blob, once they passed every check.
type PeerHello = (Hello, Vec<u8>);

impl std::fmt::Debug for SettingsCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SettingsCheck")
    }
}

/// Parameters both ends agree on, plus timers.
#[derive(Debug, Clone)]
pub struct Config {
    /// Replication generation; frames of another generation are dropped and a HELLO of another
    /// generation is refused.
    pub generation: u64,
    /// Opaque pairing digest (the VMM puts a hash of the guest image here); must match.
    pub digest: [u8; DIGEST_LEN],
    /// This side's settings blob, sent in its HELLO (opaque to the channel, at most
    /// [`frame::MAX_SETTINGS_LEN`] bytes): what the VMM needs both sides to agree on.
    pub settings: Vec<u8>,
    /// Checks the peer's settings blob at the handshake (`None`: any is accepted); a
    /// refusal is sent to the peer and returned as [`TransportError::Refused`] with
    /// [`Refusal::Settings`] on both sides.
    pub check_settings: Option<SettingsCheck>,
    /// Retransmit timeout: with records in flight and no acknowledgement progress for this
    /// long, the sender goes back to the first unacknowledged record.
    pub rto: Duration,
    /// Send a heartbeat (or an ack) when nothing was sent for this long.
    pub heartbeat_interval: Duration,
    /// Give up with [`TransportError::PeerTimeout`] after hearing nothing for this long.
    pub peer_timeout: Duration,
    /// How long a handshake may take.
    pub handshake_timeout: Duration,
    /// Most log bytes in flight (sent, not acknowledged).
    pub max_inflight_bytes: usize,
    /// Backup: the first record it expects (0: a fresh backup adopts the primary's first
    /// record). A backup that joined a running primary by state transfer starts at the record
    /// after the cut (`PROTOCOL.md` §5): the primary releases everything before it. The
    /// caller sets its producer's next sequence number to the same value.
    pub start_seq: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            generation: 1,
            digest: [0; DIGEST_LEN],
            settings: Vec::new(),
            check_settings: None,
            rto: Duration::from_millis(20),
            heartbeat_interval: Duration::from_millis(100),
            peer_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(10),
            max_inflight_bytes: 4 << 20,
            start_seq: 0,
        }
    }
}

/// Positions published by the sending side for other threads (the VMM's output rule).
#[derive(Debug, Default)]
pub struct SenderShared {
    acked: AtomicU64,
    executed: AtomicU64,
    sent: AtomicU64,
    /// Counters.
    pub stats: Stats,
}

impl SenderShared {
    /// Highest sequence number the backup holds (every record ≤ it is in its log buffer).
    pub fn acked_seq(&self) -> u64 {
        self.acked.load(Ordering::Acquire)
    }
    /// Highest sequence number the backup reported executed.
    pub fn executed_seq(&self) -> u64 {
        self.executed.load(Ordering::Acquire)
    }
    /// Highest sequence number sent (in a frame handed to the transport) so far.
    pub fn sent_seq(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }
    /// Single writer (the sender's poller): a load and a store, no locked instruction.
    fn note_sent(&self, seq: u64) {
        if seq > self.sent.load(Ordering::Relaxed) {
            self.sent.store(seq, Ordering::Relaxed);
        }
    }
}

/// Positions published by the receiving side.
#[derive(Debug, Default)]
pub struct ReceiverShared {
    executed: AtomicU64,
    received: AtomicU64,
    /// Counters.
    pub stats: Stats,
}

impl ReceiverShared {
    /// Records the backup's executed position; sent to the primary in the next ack.
    pub fn report_executed(&self, seq: u64) {
        self.executed.fetch_max(seq, Ordering::AcqRel);
    }
    /// Highest sequence number delivered into the backup's log buffer.
    pub fn received_seq(&self) -> u64 {
        self.received.load(Ordering::Acquire)
    }
    /// Highest sequence number the backup reported executed.
    pub fn executed_seq(&self) -> u64 {
        self.executed.load(Ordering::Acquire)
    }
}

fn setup(what: String) -> TransportError {
    TransportError::Setup { what }
}

fn refused(reason: Refusal, text: String) -> TransportError {
    TransportError::Refused { reason, text }
}

fn hex8(d: &[u8; DIGEST_LEN]) -> String {
    d[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Sends one frame, retrying while the transport is momentarily full (handshake only).
fn send_now(t: &mut dyn Transport, frame: &[u8], deadline: Instant) -> Result<(), TransportError> {
    loop {
        if t.send(frame)? {
            return t.flush();
        }
        t.flush()?;
        if Instant::now() > deadline {
            return Err(setup("transport stayed full during the handshake".into()));
        }
        std::thread::yield_now();
    }
}

/// The primary's end: drains a log buffer into a transport and processes acknowledgements.
pub struct Sender {
    /// The next handshake is with a backup that joined by state transfer: its HELLO may
    /// claim records that were never sent over the wire (it got them with the state).
    resume_by_transfer: bool,
    transport: Box<dyn Transport>,
    consumer: Consumer,
    cfg: Config,
    shared: Arc<SenderShared>,
    max_frame: usize,
    max_payload: usize,
    /// Position and sequence number of the next record to send.
    send_pos: u64,
    next_seq: u64,
    /// Next fragment of the record at `send_pos` (0 = not fragmenting).
    frag_next: u16,
    /// Highest position ever sent (frames below it are retransmissions).
    high_water: u64,
    acked: u64,
    dup_acks: u32,
    /// Poll counter (drives the clock reads).
    ticks: u32,
    /// Bytes allowed in flight now: `max_inflight_bytes`, down to one frame after a timeout,
    /// doubling back on each ack.
    window: usize,
    /// Highest sequence number sent when the last go-back-N happened.
    recover: u64,
    /// Current retransmit timeout: `srtt + 4·rttvar`, at least `cfg.rto`, doubled on each
    /// timeout without progress.
    rto: Duration,
    srtt: Option<Duration>,
    rttvar: Duration,
    /// (last sequence number, send time) of frames sent for the first time, for RTT samples.
    sent_times: std::collections::VecDeque<(u64, Instant)>,
    /// Frames are built here for transports without a send buffer of their own.
    frame: Vec<u8>,
    /// Heartbeats are built here.
    hb_frame: Vec<u8>,
    /// A frame built in `frame` (its length) the transport had no room for, with the state to
    /// apply once it is sent.
    pending: Option<(Advance, usize)>,
    /// Selective retransmission in progress (the backup holds frames beyond a hole).
    resend: Option<Resend>,
    /// First sequence number of the last hole resent (each hole is resent once; a hole that
    /// stays open ends in a retransmit timeout and go-back-N).
    resent_hole: u64,
    /// (last sequence number, position after it) of every frame sent since the last go-back,
    /// oldest first: an ack releases whole frames without reading their records again.
    sent_frames: std::collections::VecDeque<(u64, u64)>,
    last_progress: Instant,
    last_send: Instant,
    last_heard: Instant,
    heartbeat_nonce: u64,
    /// The backup's settings blob from its last HELLO.
    peer_settings: Vec<u8>,
}

impl std::fmt::Debug for Sender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender")
            .field("transport", &self.transport.name())
            .field("send_pos", &self.send_pos)
            .field("next_seq", &self.next_seq)
            .field("acked", &self.acked)
            .finish()
    }
}

#[derive(Debug, Clone, Copy)]
struct Advance {
    pos: u64,
    seq: u64,
    frag_next: u16,
    records: u64,
    retransmit: bool,
    /// A selective retransmission: advances the resend cursor, not the send position.
    resend: bool,
}

/// Where a frame is planned from: log position, its record's sequence number, fragment.
#[derive(Debug, Clone, Copy)]
struct Cursor {
    pos: u64,
    seq: u64,
    frag: u16,
}

/// A selective retransmission in progress: records up to `last` are sent again from `at`.
#[derive(Debug, Clone, Copy)]
struct Resend {
    at: Cursor,
    last: u64,
}

/// Outcome of handling one frame during the handshake.
enum Step<T> {
    Continue,
    Done(T),
    Fail(TransportError),
}

impl Sender {
    /// Handshakes with the backup over `transport` and returns a sender ready to `poll`.
    /// `base_seq` is the sequence number of the record at the consumer's head (the producer's
    /// `next_seq()` when the buffer is empty): the first record this sender offers.
    ///
    /// # Errors
    /// [`TransportError::Setup`] when the backup refuses (or is refused: version, generation,
    /// pairing digest, sizes, a gap) or does not answer in time; transport errors.
    pub fn connect(
        transport: Box<dyn Transport>,
        consumer: Consumer,
        base_seq: u64,
        cfg: Config,
    ) -> Result<Self, TransportError> {
        let mut s = Self::unconnected(transport, consumer, base_seq, cfg)?;
        s.handshake()?;
        Ok(s)
    }

    /// A sender with no backup yet (its link is [`crate::transport::Closed`]): it holds the
    /// log until [`Self::reconnect_with`] pairs it (a primary that runs alone and may take a
    /// backup that joins, `PROTOCOL.md` §6).
    ///
    /// # Errors
    /// [`TransportError::Log`] if the buffer's head record cannot be read.
    pub fn detached(
        consumer: Consumer,
        base_seq: u64,
        cfg: Config,
    ) -> Result<Self, TransportError> {
        Self::unconnected(Box::new(crate::transport::Closed), consumer, base_seq, cfg)
    }

    fn unconnected(
        transport: Box<dyn Transport>,
        consumer: Consumer,
        base_seq: u64,
        cfg: Config,
    ) -> Result<Self, TransportError> {
        let mut consumer = consumer;
        // The record at the head, if any, tells the first sequence number on offer.
        let base_seq = loop {
            let batch = consumer.read();
            if batch.is_empty() {
                break base_seq;
            }
            match batch.records().next() {
                Some(Ok(r)) => break r.seq(),
                Some(Err(e)) => {
                    return Err(TransportError::Log {
                        what: e.to_string(),
                    })
                }
                None => batch.release(), // only padding before the wrap
            }
        };
        let now = Instant::now();
        let rto0 = cfg.rto;
        let max_payload = consumer.ring().max_payload();
        let head = consumer.position();
        let mut s = Self {
            max_frame: transport.max_frame(),
            transport,
            consumer,
            cfg,
            shared: Arc::new(SenderShared::default()),
            max_payload,
            send_pos: head,
            next_seq: base_seq.max(1),
            frag_next: 0,
            high_water: head,
            acked: base_seq.max(1) - 1,
            dup_acks: 0,
            ticks: 0,
            window: usize::MAX,
            recover: 0,
            rto: rto0,
            srtt: None,
            rttvar: Duration::ZERO,
            sent_times: std::collections::VecDeque::with_capacity(1024),
            frame: Vec::with_capacity(64 << 10),
            hb_frame: Vec::with_capacity(64),
            pending: None,
            sent_frames: std::collections::VecDeque::with_capacity(1024),
            resend: None,
            resent_hole: 0,
            last_progress: now,
            last_send: now,
            last_heard: now,
            heartbeat_nonce: 0,
            peer_settings: Vec::new(),
            resume_by_transfer: false,
        };
        s.shared.acked.store(s.acked, Ordering::Release);
        // Everything before the first record on offer counts as delivered (acked <= sent).
        s.shared.note_sent(s.acked);
        s.window = s.cfg.max_inflight_bytes;
        Ok(s)
    }

    /// Replaces a broken transport and handshakes again; sending resumes from the backup's
    /// next expected record, so nothing is lost or delivered twice.
    ///
    /// # Errors
    /// As [`Self::connect`].
    pub fn reconnect(&mut self, transport: Box<dyn Transport>) -> Result<(), TransportError> {
        self.max_frame = transport.max_frame();
        self.transport = transport;
        self.pending = None;
        self.go_back();
        self.handshake()
    }

    /// Like [`Self::reconnect`], to a new backup under new parameters (`cfg`: its generation,
    /// settings): a backup that joined by state transfer (`PROTOCOL.md` §5). Frames from now
    /// on carry `cfg.generation`.
    ///
    /// # Errors
    /// As [`Self::connect`].
    pub fn reconnect_with(
        &mut self,
        transport: Box<dyn Transport>,
        cfg: Config,
    ) -> Result<(), TransportError> {
        let (inflight, rto) = (self.cfg.max_inflight_bytes, self.cfg.rto);
        self.cfg = cfg;
        self.cfg.max_inflight_bytes = inflight;
        self.cfg.rto = rto;
        self.resume_by_transfer = true;
        let r = self.reconnect(transport);
        self.resume_by_transfer = false;
        r
    }

    /// The positions other threads read.
    pub fn shared(&self) -> &Arc<SenderShared> {
        &self.shared
    }

    /// The transport's name.
    pub fn transport_name(&self) -> &'static str {
        self.transport.name()
    }

    /// Highest acknowledged sequence number.
    pub fn acked_seq(&self) -> u64 {
        self.acked
    }

    /// The backup's settings blob (from its HELLO).
    pub fn peer_settings(&self) -> &[u8] {
        &self.peer_settings
    }

    /// Tells the backup that this primary leaves the pair (GOODBYE with `reason` and `text`);
    /// the backup's receiver then stops with [`TransportError::PeerLeft`]. Send nothing after.
    ///
    /// # Errors
    /// Transport errors, or no room in the transport for a second.
    pub fn goodbye(&mut self, reason: GoodbyeReason, text: &str) -> Result<(), TransportError> {
        send_goodbye(self.transport.as_mut(), self.cfg.generation, reason, text)
    }

    fn handshake(&mut self) -> Result<(), TransportError> {
        check_settings_len(&self.cfg)?;
        if self.max_frame < frame::MIN_FRAME {
            return Err(TransportError::FrameTooLarge {
                len: frame::MIN_FRAME,
                max: self.max_frame,
            });
        }
        let hello = Hello {
            role: Role::Primary,
            max_frame: u32::try_from(self.max_frame).unwrap_or(u32::MAX),
            capacity: self.consumer.ring().capacity() as u64,
            max_payload: self.max_payload as u64,
            seq: self.acked + 1,
            executed: 0,
            digest: self.cfg.digest,
        };
        let mut buf = Vec::new();
        frame::encode_hello(&mut buf, self.cfg.generation, &hello, &self.cfg.settings);
        let start = Instant::now();
        let deadline = start + self.cfg.handshake_timeout;
        let mut last_hello: Option<Instant> = None;
        let cfg = self.cfg.clone();
        let peer = loop {
            let now = Instant::now();
            if now > deadline {
                return Err(setup(format!(
                    "no handshake answer from the backup over {} within {:?}",
                    self.transport.name(),
                    cfg.handshake_timeout
                )));
            }
            if last_hello.is_none_or(|t| now - t > Duration::from_millis(20)) {
                send_now(self.transport.as_mut(), &buf, deadline)?;
                last_hello = Some(now);
            }
            let mut step = Step::Continue;
            self.transport.poll_recv(&mut |bytes| {
                if !matches!(step, Step::Continue) {
                    return;
                }
                step = primary_hello_step(bytes, &cfg);
            })?;
            match step {
                Step::Continue => std::thread::yield_now(),
                Step::Done((h, settings)) => {
                    self.peer_settings = settings;
                    break h;
                }
                Step::Fail(e) => return Err(e),
            }
        };
        if (peer.max_payload as usize) < self.max_payload {
            return Err(refused(
                Refusal::Sizes,
                format!(
                    "the backup's log buffer accepts records of at most {} bytes, the \
                     primary's up to {}",
                    peer.max_payload, self.max_payload
                ),
            ));
        }
        self.max_frame = self.max_frame.min(peer.max_frame as usize);
        if peer.seq != 0 {
            if peer.seq < self.acked + 1 {
                return Err(refused(
                    Refusal::Gap,
                    format!(
                        "the backup expects record {} but the primary only holds records from \
                         {} on",
                        peer.seq,
                        self.acked + 1
                    ),
                ));
            }
            let sent = self.shared.sent_seq();
            if peer.seq - 1 > sent && self.resume_by_transfer {
                // A joined backup holds the records before its first one with the state.
                self.shared.note_sent(peer.seq - 1);
            } else if peer.seq - 1 > sent {
                return Err(refused(
                    Refusal::Gap,
                    format!(
                        "the backup claims to hold records up to {} but only {sent} were sent",
                        peer.seq - 1
                    ),
                ));
            }
            self.on_ack(peer.seq - 1, peer.executed, 0, 0, Instant::now())?;
        }
        let now = Instant::now();
        self.last_heard = now;
        self.last_progress = now;
        tracing::info!(
            transport = self.transport.name(),
            generation = self.cfg.generation,
            resume_seq = self.acked + 1,
            max_frame = self.max_frame,
            "primary paired with backup"
        );
        Ok(())
    }

    /// Goes back to the first unacknowledged record (go-back-N).
    fn go_back(&mut self) {
        self.send_pos = self.consumer.position();
        self.next_seq = self.acked + 1;
        self.frag_next = 0;
        self.pending = None;
        self.dup_acks = 0;
        // Karn: no round-trip samples from frames that may be retransmissions.
        self.sent_times.clear();
        self.sent_frames.clear();
        self.resend = None;
    }

    /// Feeds one round-trip sample into the smoothed estimate (RFC 6298) and recomputes the
    /// retransmit timeout.
    fn rtt_sample(&mut self, sample: Duration) {
        match self.srtt {
            None => {
                self.srtt = Some(sample);
                self.rttvar = sample / 2;
            }
            Some(srtt) => {
                let diff = srtt.abs_diff(sample);
                self.rttvar = (self.rttvar * 3 + diff) / 4;
                self.srtt = Some((srtt * 7 + sample) / 8);
            }
        }
        self.rto = self.rto_estimate();
        if let Some(srtt) = self.srtt {
            self.shared.stats.srtt(srtt);
        }
    }

    fn rto_estimate(&self) -> Duration {
        match self.srtt {
            Some(srtt) => (srtt + 4 * self.rttvar).clamp(self.cfg.rto, MAX_RTO),
            None => self.cfg.rto,
        }
    }

    /// Releases every record ≤ `acked` from the log buffer and advances the send position past
    /// them when it lags.
    fn on_ack(
        &mut self,
        acked: u64,
        executed: u64,
        gap: u32,
        missing: u32,
        now: Instant,
    ) -> Result<(), TransportError> {
        self.shared.executed.fetch_max(executed, Ordering::AcqRel);
        if acked <= self.acked {
            if acked == self.acked && self.next_seq > self.acked + 1 {
                self.dup_acks = self.dup_acks.saturating_add(gap);
                self.selective(missing);
            }
            return Ok(());
        }
        self.dup_acks = gap;
        // Whole frames first (no record read), then record by record for the rest (an ack
        // inside a frame: the backup was short of room).
        let mut whole = None;
        while let Some(&(last, end)) = self.sent_frames.front() {
            if last > acked {
                break;
            }
            whole = Some(end);
            self.sent_frames.pop_front();
        }
        if let Some(end) = whole {
            self.consumer.release_to(end);
        }
        loop {
            let batch = self.consumer.read();
            if batch.is_empty() {
                break;
            }
            let mut release = None;
            let mut done = false;
            for r in batch.records() {
                match r {
                    Ok(r) if r.seq() <= acked => release = Some(r.next_position()),
                    Ok(_) => {
                        done = true;
                        break;
                    }
                    Err(e) => {
                        return Err(TransportError::Log {
                            what: e.to_string(),
                        });
                    }
                }
            }
            let end = if done {
                release
            } else {
                Some(batch.end_position())
            };
            match end {
                Some(p) => self.consumer.release_to(p),
                None => break,
            }
            if done {
                break;
            }
        }
        self.acked = acked;
        // Invariant: the backup acknowledges only what it holds, so never past what was sent
        // (checked on every ack from the wire; a HELLO's resume point is below it too).
        debug_assert!(acked <= self.shared.sent_seq(), "acked {acked} past sent");
        self.shared.acked.store(acked, Ordering::Release);
        let head = self.consumer.position();
        if self.send_pos < head || self.next_seq <= acked {
            self.send_pos = head;
            self.next_seq = acked + 1;
            self.frag_next = 0;
            self.pending = None;
        }
        self.last_progress = now;
        // A resend the acks overtook restarts at the new first unacknowledged record.
        if let Some(r) = self.resend {
            if r.last <= acked {
                self.resend = None;
            } else if r.at.seq <= acked {
                self.resend = Some(Resend {
                    at: Cursor {
                        pos: head,
                        seq: acked + 1,
                        frag: 0,
                    },
                    last: r.last,
                });
            }
        }
        self.selective(missing);
        self.window = (self.window * 2).min(self.cfg.max_inflight_bytes);
        // Progress ends any back-off.
        self.rto = self.rto_estimate();
        let mut sample = None;
        while let Some(&(seq, t)) = self.sent_times.front() {
            if seq > acked {
                break;
            }
            sample = Some(t);
            self.sent_times.pop_front();
        }
        if let Some(t) = sample {
            self.rtt_sample(now.duration_since(t));
        }
        Ok(())
    }

    /// The backup holds frames beyond a hole of `missing` records after the last acked one:
    /// resend just those (once per hole), unless a go-back is already resending them.
    fn selective(&mut self, missing: u32) {
        let hole = self.acked + 1;
        if missing == 0 || self.resend.is_some() || self.resent_hole == hole {
            return;
        }
        let last = (self.acked + u64::from(missing)).min(self.next_seq.saturating_sub(1));
        if last < hole {
            return;
        }
        self.resent_hole = hole;
        self.resend = Some(Resend {
            at: Cursor {
                pos: self.consumer.position(),
                seq: hole,
                frag: 0,
            },
            last,
        });
        self.dup_acks = 0;
        self.shared.stats.selective_retransmit();
        tracing::debug!(hole, last, "selective retransmission");
    }

    /// One iteration: acknowledgements in, retransmit timer, new records out, heartbeat.
    /// Returns the amount of work done (0 = idle).
    ///
    /// # Errors
    /// Transport errors ([`TransportError::Closed`] when the backup went away), a refusal, or
    /// [`TransportError::PeerTimeout`].
    pub fn poll(&mut self) -> Result<usize, TransportError> {
        let mut work = 0;
        // Acknowledgements.
        let mut acks: Option<(u64, u64, u32, u32)> = None;
        let mut refused: Option<String> = None;
        let mut goodbye: Option<Goodbye> = None;
        let mut heard = false;
        let stats = &self.shared.stats;
        let generation = self.cfg.generation;
        work += self.transport.poll_recv(&mut |bytes| {
            stats.received(bytes.len());
            match frame::decode(bytes) {
                Err(e) => stats.decode_error(e),
                Ok(d) if d.generation != generation => stats.drop_generation(),
                Ok(d) => {
                    heard = true;
                    match d.frame {
                        Frame::Ack {
                            acked,
                            executed,
                            gap,
                            missing,
                        } => {
                            let (a, x, g, m) = acks.unwrap_or((0, 0, 0, 0));
                            // The hole the newest ack reports.
                            let m = if acked >= a { missing } else { m };
                            acks = Some((a.max(acked), x.max(executed), g.saturating_add(gap), m));
                        }
                        Frame::Refuse { text, .. } => refused = Some(text.to_owned()),
                        Frame::Goodbye { reason, text } => {
                            goodbye.get_or_insert_with(|| Goodbye {
                                reason,
                                text: text.to_owned(),
                            });
                        }
                        _ => {}
                    }
                }
            }
        })?;
        if let Some(text) = refused {
            return Err(setup(format!("the backup refused: {text}")));
        }
        // The clock (~25 ns a read) is read only when something happened, or every
        // CLOCK_EVERY idle polls for the timers: an idle poll stays short, so new records are
        // picked up sooner.
        self.ticks = self.ticks.wrapping_add(1);
        if heard || acks.is_some() || self.ticks % CLOCK_EVERY == 0 {
            let now = Instant::now();
            if heard {
                self.last_heard = now;
            }
            if let Some((acked, executed, gap, missing)) = acks {
                // An ack beyond what was sent would release outputs the backup cannot hold.
                let sent = self.shared.sent_seq();
                if acked > sent {
                    return Err(TransportError::Protocol {
                        what: format!("acknowledgement of record {acked}, only {sent} were sent"),
                    });
                }
                self.on_ack(acked, executed, gap, missing, now)?;
            }
            // The backup's last acknowledgements count; then the link ends here.
            if let Some(g) = goodbye {
                return Err(TransportError::PeerLeft(g));
            }
            self.timers(now)?;
        }
        work += self.send_data()?;
        self.transport.flush()?;
        if work == 0 && (self.next_seq > self.acked + 1 || self.frag_next > 0) {
            self.transport.wait(IDLE_WAIT)?;
        }
        let head = self.consumer.position();
        self.shared.stats.window(
            self.next_seq - 1 - self.acked.min(self.next_seq - 1),
            self.send_pos.saturating_sub(head),
        );
        Ok(work)
    }

    /// Retransmit timeout, fast retransmit, heartbeat, peer timeout.
    fn timers(&mut self, now: Instant) -> Result<(), TransportError> {
        let in_flight = self.next_seq > self.acked + 1 || self.frag_next > 0;
        if in_flight {
            let stalled = now.duration_since(self.last_progress) > self.rto;
            // Fast retransmit: three frames reported beyond a gap, at most once per window
            // (not again until everything sent before the last go-back is acknowledged).
            let fast = self.dup_acks >= 3 && self.acked >= self.recover;
            if stalled || fast {
                self.shared.stats.timeout();
                tracing::debug!(acked = self.acked, next = self.next_seq, fast, "go-back-N");
                self.recover = self.next_seq.saturating_sub(1);
                self.go_back();
                self.last_progress = now;
                // Probe with one frame, then open up again as acks come (a spurious timeout —
                // a backup that was only descheduled — then costs one frame, not a window).
                self.window = self.max_frame;
                if stalled {
                    // Back off while the backup does not answer (busy, or flow-controlled).
                    self.rto = (self.rto * 2).min(MAX_RTO);
                }
            }
        } else {
            self.last_progress = now;
        }
        if now.duration_since(self.last_send) > self.cfg.heartbeat_interval {
            self.heartbeat_nonce += 1;
            frame::encode_heartbeat(
                &mut self.hb_frame,
                self.cfg.generation,
                self.heartbeat_nonce,
            );
            if self.transport.send(&self.hb_frame)? {
                self.transport.flush()?;
                self.last_send = now;
            }
        }
        if now.duration_since(self.last_heard) > self.cfg.peer_timeout {
            return Err(TransportError::PeerTimeout {
                after: self.cfg.peer_timeout,
            });
        }
        Ok(())
    }

    /// Sends as many new (or retransmitted) frames as the window and the transport allow.
    ///
    /// Each frame is planned first (which records, how many bytes), then written once: straight
    /// into the transport's own send buffer when it offers one ([`Transport::send_in_place`]:
    /// io_uring's registered buffers, the shm ring), else into `self.frame` and handed to
    /// [`Transport::send`].
    fn send_data(&mut self) -> Result<usize, TransportError> {
        let mut frames = 0;
        let mut now: Option<Instant> = None;
        let generation = self.cfg.generation;
        loop {
            let (adv, len) = match self.pending {
                Some(p) => {
                    if !self.transport.send(&self.frame[..p.1])? {
                        break;
                    }
                    self.pending = None;
                    p
                }
                None => {
                    let plan = if let Some(r) = self.resend {
                        let mut at = r.at;
                        let plan = self.plan_frame(&mut at, r.last)?;
                        if plan.is_none() {
                            self.resend = None;
                            continue;
                        }
                        self.resend = Some(Resend { at, last: r.last });
                        plan
                    } else {
                        let head = self.consumer.position();
                        if (self.send_pos - head) as usize >= self.window {
                            break;
                        }
                        let mut at = Cursor {
                            pos: self.send_pos,
                            seq: self.next_seq,
                            frag: self.frag_next,
                        };
                        let plan = self.plan_frame(&mut at, u64::MAX)?;
                        self.send_pos = at.pos;
                        plan
                    };
                    let Some(plan) = plan else {
                        break;
                    };
                    let (transport, consumer, send_pos) =
                        (&mut self.transport, &mut self.consumer, plan.from);
                    match transport.send_in_place(plan.len, &mut |out| {
                        write_frame(consumer, send_pos, generation, &plan, out)
                    })? {
                        Some(true) => (plan.adv, plan.len),
                        Some(false) => break,
                        None => {
                            if self.frame.len() < plan.len {
                                self.frame.resize(plan.len, 0);
                            }
                            let out = &mut self.frame[..plan.len];
                            write_frame(&mut self.consumer, send_pos, generation, &plan, out);
                            if !self.transport.send(&self.frame[..plan.len])? {
                                self.pending = Some((plan.adv, plan.len));
                                break;
                            }
                            (plan.adv, plan.len)
                        }
                    }
                }
            };
            let now = *now.get_or_insert_with(Instant::now);
            self.shared.stats.sent(len, adv.records, adv.retransmit);
            frames += 1;
            if adv.resend {
                // Only forward: a frame that waited in `pending` may belong to a resend that
                // acks processed meanwhile ended, rebased on the new head or replaced by the
                // resend of a newer hole. Its end may then lie behind the cursor (behind the
                // released head, even); that frame went out anyway, the cursor stays.
                if let Some(r) = &mut self.resend {
                    if (adv.seq, adv.frag_next) > (r.at.seq, r.at.frag) {
                        r.at = Cursor {
                            pos: adv.pos,
                            seq: adv.seq,
                            frag: adv.frag_next,
                        };
                    }
                    if r.at.seq > r.last && r.at.frag == 0 {
                        self.resend = None;
                    }
                }
                continue;
            }
            if self.next_seq == self.acked + 1 && self.frag_next == 0 {
                self.last_progress = now;
            }
            if adv.records > 0 {
                if !adv.retransmit && self.sent_times.len() < MAX_TIMED {
                    self.sent_times.push_back((adv.seq - 1, now));
                }
                self.sent_frames.push_back((adv.seq - 1, adv.pos));
                self.shared.note_sent(adv.seq - 1);
            }
            self.send_pos = adv.pos;
            self.next_seq = adv.seq;
            self.frag_next = adv.frag_next;
            self.high_water = self.high_water.max(adv.pos);
        }
        if let Some(now) = now {
            self.last_send = now;
        }
        Ok(frames)
    }

    /// Plans the next DATA frame from `at` (which records or which fragment, its exact
    /// length), with no record beyond sequence number `last` (`u64::MAX`: new data; anything
    /// else: a selective retransmission); `None` when there is nothing to send. Reads record
    /// headers only; moves `at.pos` past padding.
    fn plan_frame(&mut self, at: &mut Cursor, last: u64) -> Result<Option<Plan>, TransportError> {
        let max_frame = self.max_frame;
        let resend = last != u64::MAX;
        loop {
            let batch = self.consumer.read_from(at.pos);
            if batch.is_empty() {
                return Ok(None);
            }
            let retransmit = resend || at.pos < self.high_water;
            let mut records = batch.records();
            let first = match records.next() {
                None => {
                    // Only padding up to the end of the data area: skip it.
                    at.pos = batch.end_position();
                    continue;
                }
                Some(Err(e)) => {
                    return Err(TransportError::Log {
                        what: e.to_string(),
                    })
                }
                Some(Ok(r)) => r,
            };
            if first.seq() > last {
                return Ok(None);
            }
            if first.seq() != at.seq {
                return Err(TransportError::Log {
                    what: format!(
                        "record at position {} has sequence number {}, expected {}",
                        first.position(),
                        first.seq(),
                        at.seq
                    ),
                });
            }
            let raw_len = first.raw().len();
            if at.frag > 0 || DATA_OVERHEAD + raw_len > max_frame {
                let chunk = max_frame - DATA_OVERHEAD;
                let total = raw_len.div_ceil(chunk);
                let total16 = u16::try_from(total).map_err(|_| TransportError::FrameTooLarge {
                    len: raw_len,
                    max: chunk * usize::from(u16::MAX),
                })?;
                let idx = at.frag;
                let from = usize::from(idx) * chunk;
                let to = (from + chunk).min(raw_len);
                let last = idx + 1 == total16;
                let adv = if last {
                    Advance {
                        pos: first.next_position(),
                        seq: first.seq() + 1,
                        frag_next: 0,
                        records: 1,
                        retransmit,
                        resend,
                    }
                } else {
                    Advance {
                        pos: at.pos,
                        seq: at.seq,
                        frag_next: idx + 1,
                        records: 0,
                        retransmit,
                        resend,
                    }
                };
                return Ok(Some(Plan {
                    from: at.pos,
                    first_seq: first.seq(),
                    count: 1,
                    frag: (idx, total16),
                    bytes: (from, to),
                    len: DATA_OVERHEAD + (to - from),
                    adv,
                }));
            }
            let mut len = DATA_OVERHEAD + raw_len;
            let mut count = 1u32;
            let mut end = first.next_position();
            for r in records {
                let Ok(r) = r else { break };
                if r.seq() > last {
                    break;
                }
                let raw_len = r.raw().len();
                if len + raw_len > max_frame {
                    break;
                }
                len += raw_len;
                count += 1;
                end = r.next_position();
            }
            return Ok(Some(Plan {
                from: at.pos,
                first_seq: first.seq(),
                count,
                frag: (0, 1),
                bytes: (0, 0),
                len,
                adv: Advance {
                    pos: end,
                    seq: at.seq + u64::from(count),
                    frag_next: 0,
                    records: u64::from(count),
                    retransmit,
                    resend,
                },
            }));
        }
    }

    /// Gives back the log buffer's consumer (after the link is gone for good).
    pub fn into_consumer(self) -> Consumer {
        self.consumer
    }
}

/// One DATA frame to send: planned from record headers, then written in one pass.
#[derive(Debug, Clone, Copy)]
struct Plan {
    /// Log position of the frame's first record.
    from: u64,
    first_seq: u64,
    count: u32,
    /// (fragment index, fragment count); (0, 1) for whole records.
    frag: (u16, u16),
    /// A fragment's byte range within its record.
    bytes: (usize, usize),
    /// Exact frame length.
    len: usize,
    adv: Advance,
}

/// Writes the frame `plan` describes (records from `send_pos` on) into `out`, which is exactly
/// `plan.len` bytes: header, records straight from the log buffer, checksum.
fn write_frame(
    consumer: &mut Consumer,
    send_pos: u64,
    generation: u64,
    plan: &Plan,
    out: &mut [u8],
) {
    frame::data_header(out, generation, plan.first_seq, plan.count, plan.frag);
    let batch = consumer.read_from(send_pos);
    let mut at = DATA_OVERHEAD;
    if plan.frag.1 > 1 {
        if let Some(Ok(r)) = batch.records().next() {
            let piece = &r.raw()[plan.bytes.0..plan.bytes.1];
            out[at..at + piece.len()].copy_from_slice(piece);
        }
    } else {
        for r in batch.records().take(plan.count as usize).flatten() {
            let raw = r.raw();
            out[at..at + raw.len()].copy_from_slice(raw);
            at += raw.len();
        }
    }
    frame::finish(out);
}

fn primary_hello_step(bytes: &[u8], cfg: &Config) -> Step<PeerHello> {
    if let Some((v, _)) = frame::peek_version_type(bytes) {
        if v != frame::VERSION {
            return Step::Fail(refused(
                Refusal::Version,
                format!(
                    "the backup speaks protocol version {v}, this primary speaks version {}",
                    frame::VERSION
                ),
            ));
        }
    }
    let Ok(d) = frame::decode(bytes) else {
        return Step::Continue;
    };
    match d.frame {
        Frame::Refuse { reason, text } => Step::Fail(refused(
            Refusal::from_code(reason),
            format!("the backup refused: {text}"),
        )),
        Frame::Hello { hello: h, settings } if h.role == Role::Backup => {
            if d.generation != cfg.generation {
                Step::Fail(refused(
                    Refusal::Generation,
                    format!(
                        "generation mismatch: the backup is at generation {}, this primary at {}",
                        d.generation, cfg.generation
                    ),
                ))
            } else if h.digest != cfg.digest {
                Step::Fail(refused(
                    Refusal::Digest,
                    format!(
                        "pairing digest mismatch: the backup runs image {}…, this primary {}…",
                        hex8(&h.digest),
                        hex8(&cfg.digest)
                    ),
                ))
            } else if let Some(Err(text)) = cfg.check_settings.as_ref().map(|c| (c.0)(settings)) {
                Step::Fail(refused(Refusal::Settings, text))
            } else {
                Step::Done((h, settings.to_vec()))
            }
        }
        _ => Step::Continue,
    }
}

/// A settings blob longer than a HELLO carries is a configuration error of this side.
fn check_settings_len(cfg: &Config) -> Result<(), TransportError> {
    if cfg.settings.len() > frame::MAX_SETTINGS_LEN {
        return Err(setup(format!(
            "the settings blob has {} bytes, a HELLO carries at most {}",
            cfg.settings.len(),
            frame::MAX_SETTINGS_LEN
        )));
    }
    Ok(())
}

/// How long [`Receiver::listen`] sleeps when no connection brought anything.
const LISTEN_IDLE: Duration = Duration::from_millis(1);

/// A connection [`Incoming::poll_accept`] brought.
pub struct Accepted {
    /// The link, ready for the handshake.
    pub transport: Box<dyn Transport>,
    /// Who is at the other end, for logs (`IP:PORT`, an interface, a path).
    pub peer: String,
    /// The source that strays are logged once per (the IP address without the port).
    pub source: String,
    /// The only link there is (shared memory, AF_XDP): a stray's frames are dropped but the
    /// link is kept, and it is never timed out. `false` for a connection of its own (TCP),
    /// which is dropped when it turns out a stray.
    pub persistent: bool,
}

impl std::fmt::Debug for Accepted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Accepted")
            .field("transport", &self.transport.name())
            .field("peer", &self.peer)
            .field("persistent", &self.persistent)
            .finish()
    }
}

/// Where [`Receiver::listen`] gets candidate links from: a listening socket, or one link.
pub trait Incoming: Send {
    /// The next connection that arrived, without blocking (`None`: none now).
    ///
    /// # Errors
    /// [`TransportError`] when listening itself failed.
    fn poll_accept(&mut self) -> Result<Option<Accepted>, TransportError>;
}

/// A single link, handed out once ([`Accepted::persistent`]): shared memory, AF_XDP.
#[derive(Debug)]
pub struct OneLink(pub Option<Accepted>);

impl Incoming for OneLink {
    fn poll_accept(&mut self) -> Result<Option<Accepted>, TransportError> {
        Ok(self.0.take())
    }
}

/// Connections to a TCP listener, each made a transport by `make` (tcp, tcp-spin, io_uring).
pub struct TcpIncoming {
    listener: std::net::TcpListener,
    make: TransportMaker,
}

/// Turns an accepted stream into a transport ([`TcpIncoming`]).
pub type TransportMaker =
    Box<dyn FnMut(std::net::TcpStream) -> Result<Box<dyn Transport>, TransportError> + Send>;

impl std::fmt::Debug for TcpIncoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpIncoming")
            .field("listener", &self.listener)
            .finish_non_exhaustive()
    }
}

impl TcpIncoming {
    /// Listens on `listener` (made non-blocking here); `make` wraps each accepted stream.
    ///
    /// # Errors
    /// [`TransportError::Io`] when the listener cannot be made non-blocking.
    pub fn new(
        listener: std::net::TcpListener,
        make: TransportMaker,
    ) -> Result<Self, TransportError> {
        listener
            .set_nonblocking(true)
            .map_err(|source| TransportError::Io {
                op: "set O_NONBLOCK on the listener",
                source,
            })?;
        Ok(TcpIncoming { listener, make })
    }
}

impl Incoming for TcpIncoming {
    fn poll_accept(&mut self) -> Result<Option<Accepted>, TransportError> {
        loop {
            match self.listener.accept() {
                Ok((stream, addr)) => match (self.make)(stream) {
                    Ok(transport) => {
                        return Ok(Some(Accepted {
                            transport,
                            peer: addr.to_string(),
                            source: addr.ip().to_string(),
                            persistent: false,
                        }))
                    }
                    // One connection that cannot be set up is a stray, not a failure.
                    Err(e) => tracing::warn!(%addr, error = %e, "cannot set up a connection"),
                },
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // The connection was reset before it was accepted, and the like: a stray.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionAborted => {}
                Err(source) => {
                    return Err(TransportError::Io {
                        op: "accept",
                        source,
                    })
                }
            }
        }
    }
}

/// What [`Receiver::listen`] saw before it paired.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListenReport {
    /// Stray connections (and, on a persistent link, stray HELLOs) refused or dropped.
    pub strays: u64,
    /// Who the backup paired with.
    pub paired_with: String,
}

struct Candidate {
    accepted: Accepted,
    since: Instant,
}

/// Reassembly state of a fragmented record.
#[derive(Debug, Default)]
struct Reassembly {
    seq: u64,
    next: u16,
    total: u16,
    buf: Vec<u8>,
}

/// The backup's end: moves frames into its log buffer, in order, exactly once, and acknowledges.
pub struct Receiver {
    transport: Box<dyn Transport>,
    state: RecvState,
}

struct RecvState {
    producer: Producer,
    cfg: Config,
    shared: Arc<ReceiverShared>,
    /// Next sequence number to deliver (0 before the first handshake).
    expected: u64,
    reasm: Reassembly,
    ack_due: bool,
    hello_due: bool,
    hello: Vec<u8>,
    delivered: u64,
    max_payload: usize,
    executed_sent: u64,
    ticks: u32,
    ackbuf: Vec<u8>,
    /// Whole-record frames that arrived beyond a hole, by first sequence number; delivered
    /// once the hole is filled.
    held: std::collections::BTreeMap<u64, Held>,
    held_bytes: usize,
    /// Frame bytes received in this poll, and since the last ack.
    bytes_in: usize,
    unacked_bytes: usize,
    /// Records delivered that no ack covers yet.
    unacked: bool,
    gap_seen: u32,
    heard: bool,
    last_heard: Instant,
    /// The primary's settings blob from its HELLO.
    peer_settings: Vec<u8>,
    /// The primary said GOODBYE (the poll ends the link once what came before is delivered).
    goodbye: Option<Goodbye>,
}

impl std::fmt::Debug for Receiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver")
            .field("transport", &self.transport.name())
            .field("expected", &self.state.expected)
            .finish()
    }
}

impl Receiver {
    /// Waits for the primary's HELLO on `transport`, checks it, and answers. Records will be
    /// committed into `producer`'s buffer with the primary's sequence numbers.
    ///
    /// # Errors
    /// [`TransportError::Refused`] when the HELLO is refused (version, generation, pairing
    /// digest, settings, sizes, gap; the primary is told why); [`TransportError::Setup`] when
    /// none arrives in time.
    pub fn accept(
        transport: Box<dyn Transport>,
        producer: Producer,
        cfg: Config,
    ) -> Result<Self, TransportError> {
        let mut r = Self {
            transport,
            state: RecvState::new(producer, cfg),
        };
        r.handshake()?;
        Ok(r)
    }

    /// Like [`Self::accept`], but over the connections `incoming` brings, several at a time,
    /// until one of them is the primary: a connection that closes, sends something that is not
    /// a HELLO of this protocol version, or stays silent for `handshake_timeout` is a *stray*
    /// (a port scan, a health check, an old peer): it is refused or dropped, counted, logged
    /// once per source address, and the backup keeps listening. A HELLO of this version whose
    /// generation, digest, settings or sizes disagree is refused on both sides
    /// ([`TransportError::Refused`]): that is a misconfigured primary, not a stray.
    ///
    /// # Errors
    /// [`TransportError::Refused`] as above; errors of `incoming` itself.
    pub fn listen(
        incoming: &mut dyn Incoming,
        producer: Producer,
        cfg: Config,
    ) -> Result<(Self, ListenReport), TransportError> {
        check_settings_len(&cfg)?;
        let state = RecvState::new(producer, cfg);
        let mut report = ListenReport::default();
        let mut logged = std::collections::HashSet::new();
        let mut candidates: Vec<Candidate> = Vec::new();
        let mut out = Vec::new();
        loop {
            let mut busy = false;
            while let Some(accepted) = incoming.poll_accept()? {
                busy = true;
                candidates.push(Candidate {
                    accepted,
                    since: Instant::now(),
                });
            }
            let mut i = 0;
            while i < candidates.len() {
                let c = &mut candidates[i];
                let mut step: Step<PeerHello> = Step::Continue;
                let mut refusal: Option<(u32, String)> = None;
                let polled = c.accepted.transport.poll_recv(&mut |bytes| {
                    if matches!(step, Step::Continue) && refusal.is_none() {
                        (step, refusal) = backup_hello_step(bytes, &state);
                    }
                });
                let deadline = Instant::now() + state.cfg.handshake_timeout;
                if let Some((reason, text)) = &refusal {
                    frame::encode_refuse(&mut out, state.cfg.generation, *reason, text);
                    for _ in 0..3 {
                        if send_now(c.accepted.transport.as_mut(), &out, deadline).is_err() {
                            break;
                        }
                    }
                }
                let stray = match (polled, step) {
                    (Err(e), _) => Some(e.to_string()),
                    (Ok(_), Step::Done((h, settings))) => {
                        let c = candidates.swap_remove(i);
                        let mut r = Receiver {
                            transport: c.accepted.transport,
                            state,
                        };
                        r.finish_handshake(&h, settings, deadline)?;
                        report.paired_with = c.accepted.peer;
                        tracing::info!(
                            strays = report.strays,
                            "paired with the primary after {} stray connection(s)",
                            report.strays
                        );
                        return Ok((r, report));
                    }
                    (Ok(_), Step::Fail(TransportError::Refused { reason, text }))
                        if reason != Refusal::Version =>
                    {
                        return Err(refused(reason, text));
                    }
                    (Ok(_), Step::Fail(e)) => Some(e.to_string()),
                    (Ok(_), Step::Continue)
                        if !c.accepted.persistent
                            && c.since.elapsed() > state.cfg.handshake_timeout =>
                    {
                        Some(format!("no HELLO within {:?}", state.cfg.handshake_timeout))
                    }
                    (Ok(n), Step::Continue) => {
                        busy |= n > 0;
                        None
                    }
                };
                match stray {
                    None => i += 1,
                    Some(why) => {
                        busy = true;
                        report.strays += 1;
                        let c = &candidates[i];
                        if logged.insert(c.accepted.source.clone()) {
                            tracing::warn!(
                                source = %c.accepted.peer,
                                %why,
                                "stray connection on the logging port (not the primary): \
                                 dropped, still listening (logged once per source address)"
                            );
                        }
                        if c.accepted.persistent {
                            // A datagram or shared-memory link is the only one there is: the
                            // stray's frames were dropped, the link stays.
                            i += 1;
                        } else {
                            candidates.swap_remove(i);
                        }
                    }
                }
            }
            if !busy {
                std::thread::sleep(LISTEN_IDLE);
            }
        }
    }

    /// Replaces a broken transport and handshakes again (the primary resumes from the next
    /// record this backup expects).
    ///
    /// # Errors
    /// As [`Self::accept`].
    pub fn reaccept(&mut self, transport: Box<dyn Transport>) -> Result<(), TransportError> {
        self.transport = transport;
        self.state.reasm = Reassembly::default();
        self.state.held.clear();
        self.state.held_bytes = 0;
        self.handshake()
    }

    /// The positions other threads read and write.
    pub fn shared(&self) -> &Arc<ReceiverShared> {
        &self.state.shared
    }

    /// Next sequence number this receiver expects.
    pub fn expected_seq(&self) -> u64 {
        self.state.expected
    }

    /// The primary's settings blob (from its HELLO).
    pub fn peer_settings(&self) -> &[u8] {
        &self.state.peer_settings
    }

    fn handshake(&mut self) -> Result<(), TransportError> {
        check_settings_len(&self.state.cfg)?;
        let s = &mut self.state;
        let deadline = Instant::now() + s.cfg.handshake_timeout;
        let mut out = Vec::new();
        loop {
            if Instant::now() > deadline {
                return Err(setup(format!(
                    "no HELLO from the primary over {} within {:?}",
                    self.transport.name(),
                    s.cfg.handshake_timeout
                )));
            }
            let mut step: Step<PeerHello> = Step::Continue;
            let mut refusal: Option<(u32, String)> = None;
            self.transport.poll_recv(&mut |bytes| {
                if !matches!(step, Step::Continue) {
                    return;
                }
                (step, refusal) = backup_hello_step(bytes, s);
            })?;
            if let Some((reason, text)) = &refusal {
                frame::encode_refuse(&mut out, s.cfg.generation, *reason, text);
                // Best effort: the primary learns why; our own error is what matters here.
                for _ in 0..3 {
                    if send_now(self.transport.as_mut(), &out, deadline).is_err() {
                        break;
                    }
                }
            }
            match step {
                Step::Continue => std::thread::yield_now(),
                Step::Fail(e) => return Err(e),
                Step::Done((h, settings)) => return self.finish_handshake(&h, settings, deadline),
            }
        }
    }

    /// The primary's HELLO `h` passed the checks: adopt its position (a fresh backup), keep
    /// its settings, answer with this backup's HELLO.
    fn finish_handshake(
        &mut self,
        h: &Hello,
        settings: Vec<u8>,
        deadline: Instant,
    ) -> Result<(), TransportError> {
        let s = &mut self.state;
        if s.expected == 0 {
            s.expected = h.seq.max(1);
            s.producer
                .set_next_seq(s.expected)
                .map_err(|e| TransportError::Log {
                    what: format!("backup log buffer: {e}"),
                })?;
        }
        s.peer_settings = settings;
        s.build_hello(self.transport.max_frame());
        s.last_heard = Instant::now();
        send_now(self.transport.as_mut(), &s.hello, deadline)?;
        tracing::info!(
            transport = self.transport.name(),
            generation = s.cfg.generation,
            expected = s.expected,
            "backup paired with primary"
        );
        Ok(())
    }

    /// One iteration: frames in (delivered in order into the log buffer), acks out. Returns
    /// the amount of work done (0 = idle).
    ///
    /// # Errors
    /// Transport errors: [`TransportError::Closed`] when the primary went away (records it
    /// had fully sent are already in the buffer; a partial one never is).
    pub fn poll(&mut self) -> Result<usize, TransportError> {
        let s = &mut self.state;
        let before = s.delivered;
        s.bytes_in = 0;
        // Flow control: with less room than a full frame could need, leave frames in the
        // transport (a stream transport then pushes back on the primary) until the backup's
        // consumer catches up.
        let want = (self.transport.max_frame() + 2 * RECORD_HEADER_LEN)
            .min(s.producer.ring().capacity() / 4);
        let room = s.producer.free() >= want;
        let n = if room {
            self.transport.poll_recv(&mut |bytes| s.on_frame(bytes))?
        } else {
            s.heard = true;
            0
        };
        let mut work = n;
        if s.hello_due {
            s.hello_due = false;
            if self.transport.send(&s.hello)? {
                work += 1;
            }
        }
        let executed = s.shared.executed.load(Ordering::Acquire);
        s.ticks = s.ticks.wrapping_add(1);
        if s.heard || s.ticks % CLOCK_EVERY == 0 {
            let now = Instant::now();
            if s.heard {
                s.heard = false;
                s.last_heard = now;
            } else if now.duration_since(s.last_heard) > s.cfg.peer_timeout {
                return Err(TransportError::PeerTimeout {
                    after: s.cfg.peer_timeout,
                });
            }
        }
        // Acks are coalesced while frames stream in: a poll that delivered a lot acks only once
        // ACK_EVERY bytes arrived unacknowledged; the first poll that brings little or nothing
        // acks at once.
        if s.delivered != before {
            s.unacked = true;
        }
        s.unacked_bytes += s.bytes_in;
        let streaming = s.bytes_in >= ACK_DEFER_MIN && s.unacked_bytes < ACK_EVERY;
        if (s.unacked && !streaming) || s.ack_due || executed != s.executed_sent {
            s.ack_due = false;
            s.unacked = false;
            s.unacked_bytes = 0;
            s.executed_sent = executed;
            let missing = s.missing();
            frame::encode_ack(
                &mut s.ackbuf,
                s.cfg.generation,
                s.expected.saturating_sub(1),
                executed,
                std::mem::take(&mut s.gap_seen),
                missing,
            );
            if self.transport.send(&s.ackbuf)? {
                work += 1;
                s.shared.stats.sent(s.ackbuf.len(), 0, false);
            } else {
                s.ack_due = true;
            }
        }
        // Always: a stream transport may hold bytes the socket did not take last time.
        self.transport.flush()?;
        // What came before the primary's GOODBYE is delivered and acknowledged; the link ends.
        if let Some(g) = s.goodbye.take() {
            return Err(TransportError::PeerLeft(g));
        }
        if work == 0 {
            self.transport.wait(IDLE_WAIT)?;
        }
        Ok(work)
    }

    /// Tells the primary that this backup leaves the pair (GOODBYE with `reason` and `text`);
    /// the primary's sender then stops with [`TransportError::PeerLeft`]. Send nothing after.
    ///
    /// # Errors
    /// Transport errors, or no room in the transport for a second.
    pub fn goodbye(&mut self, reason: GoodbyeReason, text: &str) -> Result<(), TransportError> {
        send_goodbye(
            self.transport.as_mut(),
            self.state.cfg.generation,
            reason,
            text,
        )
    }

    /// Gives back the log buffer's producer.
    pub fn into_producer(self) -> Producer {
        self.state.producer
    }
}

impl RecvState {
    fn new(producer: Producer, cfg: Config) -> Self {
        let max_payload = producer.ring().max_payload();
        let expected = cfg.start_seq;
        RecvState {
            producer,
            cfg,
            shared: Arc::new(ReceiverShared::default()),
            expected,
            reasm: Reassembly::default(),
            ack_due: false,
            hello_due: false,
            hello: Vec::new(),
            delivered: 0,
            max_payload,
            executed_sent: 0,
            ticks: 0,
            ackbuf: Vec::with_capacity(64),
            held: std::collections::BTreeMap::new(),
            held_bytes: 0,
            bytes_in: 0,
            unacked_bytes: 0,
            unacked: false,
            gap_seen: 0,
            heard: false,
            last_heard: Instant::now(),
            peer_settings: Vec::new(),
            goodbye: None,
        }
    }

    fn build_hello(&mut self, max_frame: usize) {
        let h = Hello {
            role: Role::Backup,
            max_frame: u32::try_from(max_frame).unwrap_or(u32::MAX),
            capacity: self.producer.ring().capacity() as u64,
            max_payload: self.max_payload as u64,
            seq: self.expected,
            executed: self.shared.executed.load(Ordering::Acquire),
            digest: self.cfg.digest,
        };
        frame::encode_hello(&mut self.hello, self.cfg.generation, &h, &self.cfg.settings);
    }

    fn on_frame(&mut self, bytes: &[u8]) {
        let stats = &self.shared.stats;
        stats.received(bytes.len());
        self.bytes_in += bytes.len();
        let d = match frame::decode(bytes) {
            Ok(d) => d,
            Err(e) => {
                stats.decode_error(e);
                return;
            }
        };
        if d.generation != self.cfg.generation {
            stats.drop_generation();
            return;
        }
        self.heard = true;
        match d.frame {
            Frame::Data { header, payload } => {
                if let Err(e) = self.on_data(header, payload) {
                    self.shared.stats.decode_error(e);
                }
                self.drain_held();
            }
            Frame::Hello { hello: h, .. } if h.role == Role::Primary => self.hello_due = true,
            Frame::Heartbeat { .. } => self.ack_due = true,
            Frame::Goodbye { reason, text } => {
                self.goodbye.get_or_insert_with(|| Goodbye {
                    reason,
                    text: text.to_owned(),
                });
            }
            _ => {}
        }
    }

    fn on_data(&mut self, h: frame::DataHeader, payload: &[u8]) -> Result<(), FrameError> {
        let stats = &self.shared.stats;
        let last = h.first_seq.saturating_add(u64::from(h.count) - 1);
        if last < self.expected {
            stats.drop_duplicate();
            self.ack_due = true;
            return Ok(());
        }
        if h.first_seq > self.expected {
            self.ack_due = true;
            if self.held.contains_key(&h.first_seq) {
                stats.drop_duplicate();
                return Ok(());
            }
            // Held until the hole before it is filled; the ack's `missing` asks the primary
            // for just the records in the hole.
            if h.frag_count == 1 && self.held_bytes + payload.len() <= HOLD_MAX {
                let span =
                    frame::validate_records(payload, h.first_seq, h.count, self.max_payload)?;
                self.held_bytes += payload.len();
                self.held.insert(
                    h.first_seq,
                    Held {
                        count: h.count,
                        span,
                        records: payload.to_vec(),
                    },
                );
                stats.held_out_of_order();
                return Ok(());
            }
            stats.drop_out_of_order();
            self.gap_seen = self.gap_seen.saturating_add(1);
            return Ok(());
        }
        if h.frag_count > 1 {
            let r = &mut self.reasm;
            if h.frag_index == 0 {
                r.seq = h.first_seq;
                r.next = 1;
                r.total = h.frag_count;
                r.buf.clear();
                r.buf.extend_from_slice(payload);
            } else if r.seq == h.first_seq && r.next == h.frag_index && r.total == h.frag_count {
                r.next += 1;
                r.buf.extend_from_slice(payload);
            } else {
                stats.drop_out_of_order();
                return Ok(());
            }
            if r.buf.len() > RECORD_HEADER_LEN + self.max_payload {
                r.buf.clear();
                r.next = 0;
                return Err(FrameError::BadBody("reassembled record too large"));
            }
            if r.next < r.total {
                return Ok(());
            }
            let buf = std::mem::take(&mut r.buf);
            r.next = 0;
            let res = (|| {
                let (rec, used) = frame::parse_record(&buf)?;
                if used != buf.len() || rec.seq_low != h.first_seq as u32 {
                    return Err(FrameError::BadBody("reassembled record inconsistent"));
                }
                if rec.payload.len() > self.max_payload {
                    return Err(FrameError::BadBody("record larger than the buffer accepts"));
                }
                self.deliver(rec.kind, rec.payload);
                Ok(())
            })();
            self.reasm.buf = buf;
            return res;
        }
        let span = frame::validate_records(payload, h.first_seq, h.count, self.max_payload)?;
        self.deliver_records(h.first_seq, span, payload)
    }

    /// Records missing right after the last one delivered, before the first held frame (0
    /// when nothing is held).
    fn missing(&self) -> u32 {
        self.held.first_key_value().map_or(0, |(&first, _)| {
            u32::try_from(first.saturating_sub(self.expected)).unwrap_or(u32::MAX)
        })
    }

    /// Delivers the held frames the log has caught up with.
    fn drain_held(&mut self) {
        while let Some(entry) = self.held.first_entry() {
            if *entry.key() > self.expected {
                break;
            }
            let (first, held) = entry.remove_entry();
            self.held_bytes -= held.records.len();
            let last = first + u64::from(held.count) - 1;
            if last < self.expected {
                continue;
            }
            if let Err(e) = self.deliver_records(first, held.span, &held.records) {
                self.shared.stats.decode_error(e);
            }
            if self.expected <= last {
                // Short of room: the rest comes again.
                break;
            }
        }
    }

    /// Delivers the records of a checked DATA body (numbered from `first_seq`, needing `span`
    /// bytes of log buffer) from `expected` on (those below are already held).
    fn deliver_records(
        &mut self,
        first_seq: u64,
        span: usize,
        payload: &[u8],
    ) -> Result<(), FrameError> {
        if first_seq == self.expected && self.deliver_reserved(span, payload) {
            return Ok(());
        }
        // Part of the frame delivered already, or no room for all of it: record by record, as
        // many as fit.
        let mut at = 0;
        let mut next_seq = first_seq;
        while at < payload.len() {
            let (rec, used) = frame::parse_record(&payload[at..])?;
            at += used;
            let seq = next_seq;
            next_seq += 1;
            if seq < self.expected {
                continue;
            }
            if !self.deliver(rec.kind, rec.payload) {
                break;
            }
        }
        Ok(())
    }

    /// Commits all the records of a checked DATA body that starts at `expected` into the
    /// backup's log buffer through one reservation (one check of the consumer's position and
    /// one publication for the frame); false, with nothing delivered, when the buffer has no
    /// room for all of them.
    fn deliver_reserved(&mut self, span: usize, payload: &[u8]) -> bool {
        let Ok(mut r) = self.producer.reserve(span) else {
            return false;
        };
        let mut at = 0;
        while at < payload.len() {
            let Ok((rec, used)) = frame::parse_record(&payload[at..]) else {
                return false; // checked by validate_records; dropping `r` commits nothing
            };
            if r.push(rec.kind, rec.payload).is_err() {
                return false;
            }
            at += used;
        }
        let next = r.commit();
        let n = next - self.expected;
        self.expected = next;
        self.delivered += n;
        self.shared.stats.delivered(n);
        self.shared.received.store(next - 1, Ordering::Release);
        true
    }

    /// Commits one record into the backup's log buffer; false when there is no room (the
    /// record will come again).
    fn deliver(&mut self, kind: u16, payload: &[u8]) -> bool {
        match self.producer.claim(kind, payload.len()) {
            Ok(mut c) => {
                c.copy_from_slice(payload);
                let seq = c.commit();
                debug_assert_eq!(seq, self.expected);
                self.expected = seq + 1;
                self.delivered += 1;
                self.shared.stats.delivered(1);
                self.shared.received.store(seq, Ordering::Release);
                true
            }
            Err(ClaimError::Full { .. }) => {
                self.shared.stats.drop_backpressure();
                false
            }
            Err(e) => {
                tracing::warn!(error = %e, "record rejected by the backup's log buffer");
                self.shared
                    .stats
                    .decode_error(FrameError::BadBody("record rejected by the buffer"));
                false
            }
        }
    }
}

/// A whole-record frame held until the hole before it is filled.
#[derive(Debug)]
struct Held {
    count: u32,
    /// Log-buffer bytes its records need (from `validate_records`).
    span: usize,
    records: Vec<u8>,
}

fn backup_hello_step(bytes: &[u8], s: &RecvState) -> (Step<PeerHello>, Option<(u32, String)>) {
    let refuse = |reason: Refusal, text: String| {
        (
            Step::Fail(refused(reason, format!("refused the primary: {text}"))),
            Some((reason.code(), text)),
        )
    };
    if let Some((v, ty)) = frame::peek_version_type(bytes) {
        if v != frame::VERSION && ty == frame::FrameType::Hello as u8 {
            return refuse(
                Refusal::Version,
                format!(
                    "protocol version mismatch: the primary speaks version {v}, this backup \
                     speaks version {}",
                    frame::VERSION
                ),
            );
        }
    }
    let Ok(d) = frame::decode(bytes) else {
        return (Step::Continue, None);
    };
    let Frame::Hello { hello: h, settings } = d.frame else {
        return (Step::Continue, None);
    };
    if h.role != Role::Primary {
        return (Step::Continue, None);
    }
    if d.generation != s.cfg.generation {
        return refuse(
            Refusal::Generation,
            format!(
                "generation mismatch: the primary is at generation {}, this backup at {}",
                d.generation, s.cfg.generation
            ),
        );
    }
    if h.digest != s.cfg.digest {
        return refuse(
            Refusal::Digest,
            format!(
                "pairing digest mismatch: the primary runs image {}…, this backup {}…",
                hex8(&h.digest),
                hex8(&s.cfg.digest)
            ),
        );
    }
    if let Some(Err(text)) = s.cfg.check_settings.as_ref().map(|c| (c.0)(settings)) {
        return refuse(Refusal::Settings, text);
    }
    if h.max_payload as usize > s.max_payload {
        return refuse(
            Refusal::Sizes,
            format!(
                "the primary's records may reach {} bytes, this backup's buffer accepts {}",
                h.max_payload, s.max_payload
            ),
        );
    }
    if s.expected != 0 && h.seq > s.expected {
        return refuse(
            Refusal::Gap,
            format!(
                "this backup needs record {} but the primary starts at {}",
                s.expected, h.seq
            ),
        );
    }
    (Step::Done((h, settings.to_vec())), None)
}
