//! The primary: records every nondeterministic input into the log buffer, in place, while the
//! channel's sender poller ships it to the backup; logs periodic state digests; releases
//! outputs under the output rule ([`super::output`]).
//!
//! ```text
//! vCPU thread:  exit ─> ChannelRecorder ─claim/encode/commit─> log buffer ─> sender poller ─> backup
//!                  └─ every `digest_interval` exits: Digest entry; at power off: End entry
//! any output:   device ─> Output entry (its digest) ─> then tagged with the log position
//! console:      guest write ─(vCPU, same exit) tag = log position─> output gate
//! sender poller: acks ─> release the gate's outputs with tag ≤ acked ─> TAP / console sink
//! shared disk:   guest write request ─> vCPU waits until acked ≥ log position ─> pwrite
//! ```
//!
//! Shared-disk mode (the backup names the same image, [`set_shared`](crate::devices::virtio::blk::BlkHandle::set_shared)): a disk write
//! is an output. [`DiskBarrier`] holds the vCPU before each write request until the backup has
//! acknowledged every entry logged so far; alone it passes at once, superseded it refuses
//! (the write never reaches the disk and the VM stops).

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ftvm_channel::{LogSender, TransportError};
use ftvm_ringbuf::{ClaimError, IdleKind, IdleStrategy};

use super::digest::register_digest;
use super::golive::PrimaryFt;
use super::log::{
    encode_output, encode_read, encode_write, AppliedControl, ControlQueue, Entry, KIND_OUTPUT,
    KIND_READ, KIND_WRITE, LOG_VERSION, OUTPUT_LEN, READ_LEN, WRITE_HEADER_LEN,
};
use super::observe::{DiskWaitsSnapshot, LogSnapshot, Observer, SideRole};
use super::output::{OutputGate, OutputStats, Sink};
use super::stop::is_planned;
pub use super::stop::BackupStopPolicy;
use crate::devices::virtio::blk::{DiskMode, WriteBarrier};
use crate::devices::virtio::net::NetHandle;
use crate::record::{Inputs, OutputDigest, Recorder};
use crate::vm::{RunOutcome, Vm, VmControl, VmError};

/// Errors of a primary or backup run.
#[derive(Debug, thiserror::Error)]
pub enum PairError {
    /// The backup's execution differed from the primary's.
    #[error("diverged at exit {exit}: {what}")]
    Diverged {
        /// The exit index.
        exit: u64,
        /// What differed.
        what: String,
    },
    /// The log could not be written (link down while the buffer was full, entry too large).
    #[error("log: {0}")]
    Log(String),
    /// The log ended before the guest powered off (the primary is gone).
    #[error("log ended at exit {exit}: {why}")]
    LogEnded {
        /// The exit index.
        exit: u64,
        /// Why.
        why: String,
    },
    /// The channel failed.
    #[error("channel")]
    Channel(#[from] TransportError),
    /// The VM failed.
    #[error("VM")]
    Vm(#[from] VmError),
    /// The guest was paused from outside.
    #[error("the VM was paused from outside at exit {0}")]
    Paused(u64),
    /// Setup failed.
    #[error("{0}")]
    Setup(String),
    /// Another node holds a newer generation: this node must not go live or release outputs.
    #[error("superseded: generation {generation} is held by {winner}; this node stops")]
    Superseded {
        /// The newest generation.
        generation: u64,
        /// Its holder.
        winner: String,
    },
    /// The arbiter failed (other than by being unreachable, which is waited out).
    #[error("arbiter")]
    Arbiter(#[from] super::arbiter::ArbiterError),
    /// The failure detector could not be started.
    #[error("failure detector")]
    Detector(#[from] super::detector::DetectorError),
    /// The peer failed (its logging link broke) and this side has no arbiter to take over
    /// with: the pair stops ([`PeerFailurePolicy::Stop`]).
    #[error(
        "the {peer} failed at exit {exit} ({why}); without an arbiter this side cannot take \
         over safely: the pair stops"
    )]
    PeerFailed {
        /// `"backup"` or `"primary"`.
        peer: &'static str,
        /// The exit index where this side stopped.
        exit: u64,
        /// How the failure showed (the link's error).
        why: String,
    },
    /// Own-copy mode: a disk request of the backup gave another result than the primary's (its
    /// copy filled up, failed, or differs): this backup can no longer take over. It stopped
    /// without going live and told the primary (GOODBYE, `CannotTakeOver`).
    #[error("this backup can no longer take over: {0}")]
    CannotTakeOver(crate::devices::virtio::blk::CopyFailure),
    /// A planned stop ([`super::stop`]): this side was asked to stop, or its peer left the
    /// pair as planned; no failover happened.
    #[error("{0}")]
    Stopped(super::stop::Stopped),
}

/// What a primary **without an arbiter** does when its backup fails (its logging link
/// breaks). With an arbiter the primary always goes on alone after winning the next
/// generation ([`super::golive`]).
///
/// Without an arbiter nothing can tell a dead backup from a partitioned one, so by default the
/// pair stops: the primary cannot keep its promise (no acknowledged output lost at a failover)
/// without a backup, and its held outputs wait for acknowledgements that will never come. A
/// backup without an arbiter never goes live (it would risk a second live copy), so a primary
/// that goes on alone is the only live copy; it runs *unprotected*, which the operator must
/// choose explicitly.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PeerFailurePolicy {
    /// Stop promptly with [`PairError::PeerFailed`]; held outputs are never released.
    #[default]
    Stop,
    /// Warn loudly, stop logging, release every held output and run on as a lone primary
    /// without protection.
    GoAloneUnprotected,
}

/// The messages of `e` and all its sources, joined with `: `.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Replication parameters (the primary sends them to the backup in the log header).
#[derive(Debug, Clone)]
pub struct PairOptions {
    /// Exits between two register-digest checkpoints.
    pub digest_interval: u64,
    /// Every how many checkpoints memory is digested too (0: only at the end).
    pub mem_digest_every: u64,
    /// How the vCPU waits for log space and the backup for entries.
    pub idle: IdleKind,
    /// How long the end of the run waits for acknowledgements.
    pub ack_timeout: Duration,
    /// Primary without an arbiter ([`run_primary`]): what to do when the backup fails.
    pub on_peer_failure: PeerFailurePolicy,
    /// Primary: what to do when the backup stops as planned ([`super::stop`]).
    pub on_backup_stop: BackupStopPolicy,
    /// Primary asked to stop: how long it waits for the backup to acknowledge the log before
    /// it says GOODBYE ([`super::stop`]).
    pub stop_timeout: Duration,
}

impl Default for PairOptions {
    fn default() -> Self {
        PairOptions {
            digest_interval: 10_000,
            mem_digest_every: 0,
            idle: IdleKind::Yield,
            ack_timeout: Duration::from_secs(30),
            on_peer_failure: PeerFailurePolicy::Stop,
            on_backup_stop: BackupStopPolicy::GoAlone,
            stop_timeout: Duration::from_secs(10),
        }
    }
}

/// Writes log entries into the sender's log buffer in place.
#[derive(Debug, Clone)]
pub struct LogWriter {
    sender: Arc<Mutex<LogSender>>,
    position: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
    entries: Arc<AtomicU64>,
    error: Arc<Mutex<Option<String>>>,
    idle: IdleKind,
    controls: ControlQueue,
    stalls: Arc<AtomicU64>,
    stall_ns: Arc<AtomicU64>,
    mode: Arc<AtomicU8>,
    /// The throttle's pacer, consulted after each append (on the vCPU thread).
    pacer: Arc<std::sync::OnceLock<Arc<super::throttle::Pacer>>>,
    /// An upper bound on the throttle's share (the join's auto-converge lever).
    cap: super::throttle::ShareCap,
    /// The side's live counters ([`super::observe`]).
    observer: Observer,
}

/// [`LogWriter`] modes.
const MODE_LOGGING: u8 = 0;
/// Logging, and a failure detector decides what a dead link means: appends wait for log space
/// even when the link is down (until the mode changes).
const MODE_MANAGED: u8 = 1;
/// The primary runs alone: appends are dropped.
const MODE_ALONE: u8 = 2;
/// The primary lost the take-over: appends fail.
const MODE_FENCED: u8 = 3;

/// How often and how long the vCPU waited for log space.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogStalls {
    /// Appends that found the log buffer full and waited.
    pub count: u64,
    /// Total time waited.
    pub time: Duration,
}

impl LogStalls {
    /// The stalls from the writer's counters (a count and nanoseconds).
    fn read(count: &AtomicU64, ns: &AtomicU64) -> Self {
        LogStalls {
            count: count.load(Ordering::Relaxed),
            time: Duration::from_nanos(ns.load(Ordering::Relaxed)),
        }
    }
}

impl LogWriter {
    /// A writer over `sender`'s buffer.
    pub fn new(mut sender: LogSender, idle: IdleKind) -> Self {
        let position = Arc::new(AtomicU64::new(
            sender.producer().next_seq().saturating_sub(1),
        ));
        let shared = Arc::clone(sender.shared());
        let writer = LogWriter {
            sender: Arc::new(Mutex::new(sender)),
            position,
            bytes: Arc::default(),
            entries: Arc::default(),
            error: Arc::default(),
            idle,
            controls: ControlQueue::new(),
            stalls: Arc::default(),
            stall_ns: Arc::default(),
            mode: Arc::new(AtomicU8::new(MODE_LOGGING)),
            pacer: Arc::default(),
            cap: super::throttle::ShareCap::default(),
            observer: Observer::new(SideRole::Primary),
        };
        // The counters only, never a clone of the writer: the observer lives in the writer, and
        // a writer in its closure would keep the LogSender (and so the link) alive after the
        // last user dropped the writer — the backup then waited 30 s for the hang-up.
        let (position, entries, bytes) = (
            Arc::clone(&writer.position),
            Arc::clone(&writer.entries),
            Arc::clone(&writer.bytes),
        );
        let (stalls, stall_ns) = (Arc::clone(&writer.stalls), Arc::clone(&writer.stall_ns));
        let acks = Arc::clone(&shared);
        writer.observer.set_log(move || {
            let s = LogStalls::read(&stalls, &stall_ns);
            LogSnapshot {
                written: position.load(Ordering::Acquire),
                sent: Some(acks.sent_seq()),
                acked: acks.acked_seq(),
                executed: acks.executed_seq(),
                entries: entries.load(Ordering::Relaxed),
                bytes: Some(bytes.load(Ordering::Relaxed)),
                stalls: s.count,
                stall_ms: super::observe::ms(s.time),
            }
        });
        writer.observer.set_channel(move || shared.stats.snapshot());
        writer
    }

    /// The side's live counters: the log, the channel, and what the run registers (exits,
    /// outputs, throttle, detector, disk waits).
    pub fn observer(&self) -> &Observer {
        &self.observer
    }

    /// Sleeps the pacer made the vCPU take and their total (zero without a throttle).
    pub fn pacer_sleeps(&self) -> (u64, Duration) {
        self.pacer.get().map_or((0, Duration::ZERO), |p| p.slept())
    }

    /// The bound on the vCPU's CPU share that a throttle started for this writer
    /// ([`super::throttle::Throttle::for_writer`]) obeys; a join lowers it to make pre-copy
    /// converge ([`super::join`], auto-converge).
    pub fn share_cap(&self) -> &super::throttle::ShareCap {
        &self.cap
    }

    /// Paces the vCPU thread at its appends with `pacer` (the throttle's pause actuator,
    /// [`super::throttle::pace`]). Only the first pacer set is used.
    pub fn set_pacer(&self, pacer: Arc<super::throttle::Pacer>) {
        let _ = self.pacer.set(pacer);
    }

    pub(crate) fn set_mode(&self, mode: u8) {
        self.mode.store(mode, Ordering::Release);
    }

    pub(crate) fn set_managed(&self) {
        self.set_mode(MODE_MANAGED);
    }

    /// Stops logging: appends are dropped from now on (the primary runs alone).
    pub(crate) fn set_alone(&self) {
        self.set_mode(MODE_ALONE);
    }

    /// Appends fail from now on (this primary was superseded).
    pub(crate) fn set_fenced(&self) {
        self.set_mode(MODE_FENCED);
    }

    /// The counter of log payload bytes written (for the lag in bytes).
    pub fn bytes_counter(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.bytes)
    }

    /// Whether logging stopped because the primary runs alone.
    pub fn is_alone(&self) -> bool {
        self.mode.load(Ordering::Acquire) == MODE_ALONE
    }

    /// The queue of controls logged and applied at the next checkpoint of [`run_primary`]
    /// (see [`ControlQueue`]).
    pub fn controls(&self) -> &ControlQueue {
        &self.controls
    }

    /// How often and how long appends waited for log space so far.
    pub fn stalls(&self) -> LogStalls {
        LogStalls::read(&self.stalls, &self.stall_ns)
    }

    /// The sender (acks, counters).
    ///
    /// Lock order: the vCPU takes this lock inside the net device's transmit lock (a transmit
    /// logs its frames' digest), so never hold the guard while switching the transmit mode
    /// ([`NetHandle::switch_tx`](crate::devices::virtio::net::NetHandle::switch_tx), as
    /// going alone does); bind what you read to a local first, not as an `if let` temporary.
    pub fn sender(&self) -> std::sync::MutexGuard<'_, LogSender> {
        self.sender.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Last sequence number written (the log position outputs are tagged with).
    pub fn position(&self) -> &Arc<AtomicU64> {
        &self.position
    }

    /// Payload bytes logged so far.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Entries logged so far.
    pub fn entries(&self) -> u64 {
        self.entries.load(Ordering::Relaxed)
    }

    /// The first error met by a write through the [`Recorder`] interface (which cannot fail).
    pub fn take_error(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// Claims `len` bytes of `kind`, lets `fill` encode in place, commits; waits (with the idle
    /// strategy) while the buffer is full and the link is up. Returns the sequence number.
    fn append_with(
        &self,
        kind: u16,
        len: usize,
        fill: impl Fn(&mut [u8]),
    ) -> Result<u64, PairError> {
        let mut idle = None;
        let mut stalled: Option<Instant> = None;
        loop {
            match self.mode.load(Ordering::Acquire) {
                MODE_ALONE => return Ok(self.position.load(Ordering::Acquire)),
                MODE_FENCED => {
                    return Err(PairError::Log(
                        "this primary was superseded: it no longer logs".into(),
                    ))
                }
                _ => {}
            }
            let mut sender = self.sender.lock().unwrap_or_else(|e| e.into_inner());
            match sender.producer().claim(kind, len) {
                Ok(mut claim) => {
                    fill(&mut claim);
                    let seq = claim.commit();
                    sender.notify(seq);
                    self.position.store(seq, Ordering::Release);
                    self.bytes.fetch_add(len as u64, Ordering::Relaxed);
                    self.entries.fetch_add(1, Ordering::Relaxed);
                    if let Some(t) = stalled {
                        self.stalls.fetch_add(1, Ordering::Relaxed);
                        self.stall_ns
                            .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
                    }
                    drop(sender);
                    if let Some(p) = self.pacer.get() {
                        p.pace();
                    }
                    return Ok(seq);
                }
                Err(ClaimError::Full { .. }) => {
                    stalled.get_or_insert_with(Instant::now);
                }
                Err(e) => return Err(PairError::Log(e.to_string())),
            }
            if !sender.is_running() && self.mode.load(Ordering::Acquire) == MODE_LOGGING {
                let e = sender
                    .error()
                    .map_or_else(|| "link down".to_string(), |e| e.to_string());
                return Err(PairError::Log(format!(
                    "log buffer full and the link is down: {e}"
                )));
            }
            // Wait without the lock: the FT monitor reads the sender meanwhile.
            drop(sender);
            idle.get_or_insert_with(|| self.idle.build()).idle(0);
        }
    }

    /// Appends one entry.
    ///
    /// # Errors
    /// [`PairError::Log`].
    pub fn append(&self, entry: &Entry) -> Result<u64, PairError> {
        self.append_with(entry.kind(), entry.encoded_len(), |p| entry.encode(p))
    }

    fn max_write_chunk(&self) -> usize {
        let mut sender = self.sender.lock().unwrap_or_else(|e| e.into_inner());
        let max = sender.producer().ring().max_payload();
        max.saturating_sub(WRITE_HEADER_LEN).clamp(1, 64 << 10)
    }

    fn fail(&self, e: PairError) {
        tracing::error!(error = %e, "cannot log an input");
        self.error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(e.to_string());
    }
}

/// The [`Recorder`] of a primary: every input becomes an entry of the log.
#[derive(Debug)]
pub struct ChannelRecorder {
    writer: LogWriter,
    chunk: usize,
}

impl ChannelRecorder {
    /// A recorder writing through `writer`.
    pub fn new(writer: LogWriter) -> Self {
        let chunk = writer.max_write_chunk();
        ChannelRecorder { writer, chunk }
    }
}

impl Recorder for ChannelRecorder {
    fn external_read(&mut self, exit: u64, addr: u64, value: u64) {
        let r = self
            .writer
            .append_with(KIND_READ, READ_LEN, |p| encode_read(p, exit, addr, value));
        if let Err(e) = r {
            self.writer.fail(e);
        }
    }

    fn output(&mut self, exit: u64, out: &OutputDigest) {
        // Logged before the device tags the output: the digest's position is at most the
        // output's tag, so an output is released only once the backup holds its digest.
        let r = self
            .writer
            .append_with(KIND_OUTPUT, OUTPUT_LEN, |p| encode_output(p, exit, out));
        if let Err(e) = r {
            self.writer.fail(e);
        }
    }

    fn wants_outputs(&self) -> bool {
        true
    }

    fn guest_write(&mut self, exit: u64, gpa: u64, data: &[u8]) {
        for (i, chunk) in data.chunks(self.chunk).enumerate() {
            let at = gpa + (i * self.chunk) as u64;
            let r = self
                .writer
                .append_with(KIND_WRITE, WRITE_HEADER_LEN + chunk.len(), |p| {
                    encode_write(p, exit, at, chunk)
                });
            if let Err(e) = r {
                self.writer.fail(e);
                return;
            }
        }
    }
}

/// What a primary run did.
#[derive(Debug, Clone)]
pub struct PrimaryReport {
    /// Power-off code.
    pub code: u64,
    /// Exits handled.
    pub exits: u64,
    /// Entries logged.
    pub entries: u64,
    /// Payload bytes logged.
    pub log_bytes: u64,
    /// Final memory digest.
    pub mem_digest: u64,
    /// Final register digest.
    pub regs_digest: u64,
    /// Wall time of the run.
    pub elapsed: Duration,
    /// Output rule counters.
    pub outputs: OutputStats,
    /// Whether the backup reported executing the End entry.
    pub backup_finished: bool,
    /// Times and time the vCPU waited for log space.
    pub log_stalls: LogStalls,
    /// The controls logged and applied, in order (see [`LogWriter::controls`]).
    pub controls: Vec<AppliedControl>,
    /// Shared-disk mode: the writes held until the backup acknowledged the log (`None`: the
    /// disk is not shared).
    pub disk_waits: Option<DiskWaits>,
}

/// How the shared-disk writes of a primary waited for acknowledgements ([`DiskBarrier`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiskWaits {
    /// Write requests that passed the barrier.
    pub writes: u64,
    /// Of those, how many found the log not yet acknowledged and waited.
    pub waited: u64,
    /// Total time waited.
    pub time: Duration,
    /// Longest single wait.
    pub max: Duration,
    /// Writes that passed without waiting because this primary ran alone.
    pub alone: u64,
}

/// The [`WriteBarrier`] of a primary in shared-disk mode: a write may reach the disk once the
/// backup acknowledged the log position current when it was issued (the output rule, applied
/// synchronously on the vCPU thread). While the link is down and a failure detector manages the
/// pair, it waits for the decision: alone (won the next generation) it passes, superseded it
/// refuses. Without a detector, a link that is down refuses (nobody will ever acknowledge).
pub struct DiskBarrier {
    writer: LogWriter,
    acks: Arc<ftvm_channel::reliable::SenderShared>,
    /// Shared with the observer's closure, which must not hold the barrier (the barrier holds
    /// the writer, the writer the observer: a cycle that would keep the link open).
    waits: Arc<Mutex<DiskWaits>>,
    /// The VM's control: a write waiting while a stop is requested and the link is down
    /// gives up (nobody will acknowledge it).
    control: std::sync::OnceLock<crate::vm::VmControl>,
}

impl std::fmt::Debug for DiskBarrier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskBarrier")
            .field("waits", &self.waits())
            .finish_non_exhaustive()
    }
}

/// Spins of the barrier before it yields, yields before it sleeps.
const BARRIER_SPINS: u32 = 200;
const BARRIER_YIELDS: u32 = 200;

impl DiskBarrier {
    /// A barrier on `writer`'s log and acknowledgements.
    pub fn new(writer: &LogWriter) -> Self {
        let acks = Arc::clone(writer.sender().shared());
        DiskBarrier {
            writer: writer.clone(),
            acks,
            waits: Arc::default(),
            control: std::sync::OnceLock::new(),
        }
    }

    /// The counters so far.
    pub fn waits(&self) -> DiskWaits {
        *self.waits.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn count(&self, started: Option<Instant>, alone: bool) {
        let mut w = self.waits.lock().unwrap_or_else(|e| e.into_inner());
        w.writes += 1;
        if alone {
            w.alone += 1;
        }
        if let Some(t) = started {
            let d = t.elapsed();
            w.waited += 1;
            w.time += d;
            w.max = w.max.max(d);
        }
    }
}

impl WriteBarrier for DiskBarrier {
    fn before_write(&self) -> Result<(), String> {
        let target = self.writer.position().load(Ordering::Acquire);
        let mut started: Option<Instant> = None;
        let mut polls = 0u32;
        // Spin, yield, then sleep 50 µs at a time.
        let mut idle = ftvm_ringbuf::BackoffPark::new(
            BARRIER_SPINS,
            BARRIER_YIELDS,
            Duration::from_micros(50),
            Duration::from_micros(50),
        );
        loop {
            match self.writer.mode.load(Ordering::Acquire) {
                MODE_ALONE => {
                    self.count(started, true);
                    return Ok(());
                }
                MODE_FENCED => return Err("this primary was superseded".into()),
                _ => {}
            }
            if self.acks.acked_seq() >= target {
                self.count(started, false);
                return Ok(());
            }
            started.get_or_insert_with(Instant::now);
            polls += 1;
            if polls > BARRIER_SPINS + BARRIER_YIELDS
                && polls % 64 == 0
                && (self.writer.mode.load(Ordering::Acquire) == MODE_LOGGING
                    || self.control.get().is_some_and(|c| c.stop_requested()))
                && !self.writer.sender().is_running()
            {
                return Err(format!(
                    "the link is down and the backup never acknowledged log position {target}"
                ));
            }
            idle.idle(0);
        }
    }
}

/// Watches the logging link of a primary **without an arbiter** and applies its
/// [`PeerFailurePolicy`] when the link breaks (the backup failed). A thread that looks every
/// [`LINK_WATCH_EVERY`] and sleeps in between (no spinning); stopped when the run ends.
struct LinkWatch {
    stop: Arc<std::sync::atomic::AtomicBool>,
    failed: Arc<Mutex<Option<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// How often [`LinkWatch`] looks at the link.
const LINK_WATCH_EVERY: Duration = Duration::from_millis(5);

impl LinkWatch {
    /// Watches `writer`'s link; going alone releases `gate` and switches `net` to direct
    /// transmits, stopping kicks the VM through `control`.
    fn start(
        writer: &LogWriter,
        gate: &Arc<OutputGate>,
        (net, control): (Option<NetHandle>, VmControl),
        (policy, on_stop): (PeerFailurePolicy, BackupStopPolicy),
    ) -> Result<Self, PairError> {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let failed = Arc::new(Mutex::new(None));
        let (writer, gate) = (writer.clone(), Arc::clone(gate));
        let (stop2, failed2) = (Arc::clone(&stop), Arc::clone(&failed));
        let thread = std::thread::Builder::new()
            .name("ft-link-watch".into())
            .spawn(move || {
                while !stop2.load(Ordering::Acquire) {
                    // The sender's lock is released at the end of this block, before anything
                    // below takes the net device's transmit lock (`release_alone`): a vCPU
                    // transmitting holds that lock and then takes the sender's to log the
                    // frames' digest. Holding both here in the other order deadlocked the
                    // primary (a `writer.sender()` temporary in an `if let` lives through its
                    // body): it stayed up, alone, and answered no client.
                    let (why, goodbye) = {
                        let s = writer.sender();
                        if s.is_running() {
                            (None, None)
                        } else {
                            let why = s.error().map_or_else(
                                || "the logging link is down".to_string(),
                                |e| format!("logging link: {e}"),
                            );
                            (Some(why), s.peer_goodbye())
                        }
                    };
                    let Some(why) = why else {
                        std::thread::sleep(LINK_WATCH_EVERY);
                        continue;
                    };
                    if let Some(g) = goodbye.filter(is_planned) {
                        // A planned stop, not a failure: the backup will not go live.
                        match on_stop {
                            BackupStopPolicy::GoAlone => {
                                tracing::warn!(
                                    goodbye = %g,
                                    "UNPROTECTED: the backup stopped as planned; this primary \
                                     goes on ALONE (no backup, no failover), held outputs \
                                     released now"
                                );
                                super::golive::release_alone(&writer, &gate, net.as_ref(), 1);
                            }
                            BackupStopPolicy::Stop => {
                                tracing::warn!(
                                    goodbye = %g,
                                    "the backup stopped as planned: this primary stops too"
                                );
                                control.request_stop();
                            }
                        }
                        return;
                    }
                    match policy {
                        PeerFailurePolicy::Stop => {
                            tracing::error!(
                                %why,
                                "the backup failed and there is no arbiter: the pair stops \
                                 (held outputs are not released)"
                            );
                            *failed2.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
                            control.kick();
                        }
                        PeerFailurePolicy::GoAloneUnprotected => {
                            tracing::warn!(
                                %why,
                                "UNPROTECTED: the backup failed and there is no arbiter; this \
                                 primary goes on ALONE as asked (--go-alone-unprotected): no \
                                 backup, no failover, held outputs released now"
                            );
                            super::golive::release_alone(&writer, &gate, net.as_ref(), 1);
                        }
                    }
                    return;
                }
            })
            .map_err(|e| PairError::Setup(format!("link watch thread: {e}")))?;
        Ok(LinkWatch {
            stop,
            failed,
            thread: Some(thread),
        })
    }

    /// Why the backup is taken for failed, once the link broke under [`PeerFailurePolicy::Stop`].
    fn failure(&self) -> Option<String> {
        self.failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Stops watching (the run ended: the link going down now is no failure).
    fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for LinkWatch {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Test hooks of a primary run (deliberate nondeterminism).
#[derive(Debug, Default, Clone)]
pub struct PrimaryHooks {
    /// At this checkpoint number, write bytes into guest memory at this address without logging
    /// them (as if the VMM had handed the guest uninitialised host data).
    pub unlogged_write: Option<(u64, u64, Vec<u8>)>,
}

/// Runs `vm` as the primary until it powers off: logs through `writer`, releases the console
/// bytes collected in `console` to `console_sink` under the output rule, and the frames the
/// guest transmits on its net device (if any) to its TAP under the same rule.
///
/// # Errors
/// [`PairError`].
pub fn run_primary(
    vm: &mut Vm,
    writer: &LogWriter,
    opts: &PairOptions,
    console: Option<(Arc<Mutex<Vec<u8>>>, Sink)>,
    hooks: &PrimaryHooks,
) -> Result<PrimaryReport, PairError> {
    primary_loop(vm, writer, opts, console, hooks, None)
}

/// The primary's run; with `ft`, failure detection and going alone ([`super::golive`]).
pub(crate) fn primary_loop(
    vm: &mut Vm,
    writer: &LogWriter,
    opts: &PairOptions,
    console: Option<(Arc<Mutex<Vec<u8>>>, Sink)>,
    hooks: &PrimaryHooks,
    mut ft: Option<&mut PrimaryFt>,
) -> Result<PrimaryReport, PairError> {
    let start = Instant::now();
    let acks = Arc::clone(writer.sender().shared());
    let gate = Arc::new(
        OutputGate::start(acks, Arc::clone(writer.position()))
            .map_err(|e| PairError::Setup(format!("output thread: {e}")))?,
    );
    if !gate.hook_into(&writer.sender()) {
        tracing::debug!("the log sender has an ack hook already; outputs are polled for");
    }
    let console_hooked = console.is_some();
    if let Some((buf, sink)) = console {
        gate.add_buffer_source(buf, sink);
    }
    if let Some(net) = vm.net() {
        gate.gate_net(net);
    }
    let disk = vm.shared_disk().cloned();
    let barrier = disk.as_ref().map(|d| {
        let b = Arc::new(DiskBarrier::new(writer));
        let _ = b.control.set(vm.control());
        d.set_mode(DiskMode::Gated(b.clone()));
        b
    });
    let observer = writer.observer();
    observer.watch_exits(vm.stats());
    gate.observe_into(observer);
    if let Some(b) = &barrier {
        let waits = Arc::clone(&b.waits);
        observer.set_disk_waits(move || {
            let w = *waits.lock().unwrap_or_else(|e| e.into_inner());
            DiskWaitsSnapshot {
                writes: w.writes,
                waited: w.waited,
                time_ms: super::observe::ms(w.time),
                max_ms: super::observe::ms(w.max),
                alone: w.alone,
            }
        });
    }
    writer.append(&Entry::Header {
        version: LOG_VERSION,
        digest_interval: opts.digest_interval,
        mem_digest_every: opts.mem_digest_every,
    })?;
    if let Some(f) = ft.as_deref_mut() {
        f.start(Arc::clone(&gate), writer, vm, opts.on_backup_stop)?;
    }
    // Without an arbiter, the link breaking is the backup's failure: the policy decides.
    let mut watch = match ft {
        None => Some(LinkWatch::start(
            writer,
            &gate,
            (vm.net().cloned(), vm.control()),
            (opts.on_peer_failure, opts.on_backup_stop),
        )?),
        Some(_) => None,
    };
    let peer_failed = |watch: &Option<LinkWatch>, exit: u64| {
        watch
            .as_ref()
            .and_then(LinkWatch::failure)
            .map(|why| PairError::PeerFailed {
                peer: "backup",
                exit,
                why,
            })
    };
    if console_hooked {
        // The console bytes go to the gate at the exit that wrote them.
        vm.set_console_hook(Some(Arc::new(gate.source_drainer())));
    }
    vm.set_inputs(Inputs::Live(Box::new(ChannelRecorder::new(writer.clone()))));
    let interval = opts.digest_interval.max(1);
    let mut checkpoint = 0u64;
    let mut logging = true;
    let result = loop {
        if let Some(e) = ft.as_deref().and_then(PrimaryFt::superseded) {
            break Err(e);
        }
        if let Some(e) = peer_failed(&watch, vm.stats().total()) {
            break Err(e);
        }
        if logging && writer.is_alone() {
            // Running alone: no more log entries, inputs straight from the devices.
            vm.set_inputs(Inputs::default());
            logging = false;
        }
        let target = (vm.stats().total() / interval + 1) * interval;
        let outcome = vm.run_until(Some(target));
        if outcome.is_err() {
            // A superseded primary's shared-disk write is refused with a device error.
            if let Some(e) = ft.as_deref().and_then(PrimaryFt::superseded) {
                break Err(e);
            }
            // So is a write the disk's owner record fenced off (a newer generation owns it).
            if let Some(e) = super::golive::disk_superseded(vm) {
                break Err(e);
            }
            // A write given up while stopping (the backup stopped too).
            if vm.stop_requested() {
                break Ok((None, vm.stats().total()));
            }
            // A shared-disk write refused because the link broke: the backup failed.
            if let Some(e) = peer_failed(&watch, vm.stats().total()) {
                break Err(e);
            }
        }
        if let Some(e) = writer.take_error() {
            if let Some(e) = ft.as_deref().and_then(PrimaryFt::superseded) {
                break Err(e);
            }
            if let Some(e) = peer_failed(&watch, vm.stats().total()) {
                break Err(e);
            }
            break Err(PairError::Log(e));
        }
        let exit = vm.stats().total();
        match outcome? {
            RunOutcome::ExitLimit => {
                checkpoint += 1;
                if writer.is_alone() {
                    // Controls still take effect; there is no backup to tell.
                    for (key, value) in writer.controls().take_pending() {
                        writer.controls().apply(AppliedControl { exit, key, value });
                    }
                    continue;
                }
                log_controls(writer, exit)?;
                let mem = (opts.mem_digest_every > 0 && checkpoint % opts.mem_digest_every == 0)
                    .then(|| vm.memory_digest());
                writer.append(&Entry::Digest {
                    exit,
                    regs: register_digest(vm),
                    mem,
                })?;
                if let Some((at, gpa, data)) = &hooks.unlogged_write {
                    if *at == checkpoint {
                        use vm_memory::Bytes;
                        let _ = vm.memory().write_slice(data, vm_memory::GuestAddress(*gpa));
                    }
                }
            }
            RunOutcome::PoweredOff(code) => break Ok((Some(code), exit)),
            // The FT monitor kicks the vCPU when this primary was superseded, the link watch
            // when the backup failed; a planned stop ([`super::stop`]) was asked for.
            RunOutcome::Paused => match ft.as_deref().and_then(PrimaryFt::superseded) {
                Some(e) => break Err(e),
                None if vm.stop_requested() => break Ok((None, exit)),
                // A joining backup asked for the cut ([`super::join`]): here, between exits.
                None if super::join::cut_due(ft.as_deref()) => {
                    if let Some(f) = ft.as_deref_mut() {
                        match super::join::cut(f, vm, writer, &gate, opts) {
                            Ok(joined) => logging |= joined,
                            Err(e) => break Err(e),
                        }
                    }
                    continue;
                }
                // A kick meant for a join that was given up, or for going live: a lone
                // primary with failover runs on.
                None if ft.is_some() && writer.is_alone() => continue,
                None => break Err(peer_failed(&watch, exit).unwrap_or(PairError::Paused(exit))),
            },
        }
    };
    if let Some(w) = watch.as_mut() {
        w.stop();
    }
    vm.set_inputs(Inputs::default());
    vm.set_console_hook(None);
    if let Some(d) = &disk {
        d.set_mode(DiskMode::Direct);
    }
    let (code, exits) = result?;
    let Some(code) = code else {
        return Err(super::stop::primary_stop(
            writer,
            &gate,
            ft,
            exits,
            opts.stop_timeout,
        ));
    };
    let mem_digest = vm.memory_digest();
    let regs_digest = register_digest(vm);
    let end = writer.append(&Entry::End {
        exit: exits,
        code,
        regs: regs_digest,
        mem: mem_digest,
    })?;
    let mut backup_finished = false;
    match ft {
        // Alone (unprotected): nobody acknowledges any more.
        None if writer.is_alone() => {}
        None => {
            if !writer.sender().wait_acked(end, opts.ack_timeout)? {
                return Err(PairError::Log(format!(
                    "the backup did not acknowledge the end of the log within {:?}",
                    opts.ack_timeout
                )));
            }
        }
        Some(f) => {
            // Acknowledged, or the backup failed meanwhile and this primary went alone.
            let deadline = Instant::now() + opts.ack_timeout;
            loop {
                if let Some(e) = f.superseded() {
                    return Err(e);
                }
                if writer.is_alone() || writer.sender().acked_seq() >= end {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(PairError::Log(format!(
                        "the backup did not acknowledge the end of the log within {:?}",
                        opts.ack_timeout
                    )));
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            // The pair ended normally (or alone): the link going down now is no failure.
            f.stop_monitor();
        }
    }
    if !gate.flush(opts.ack_timeout) {
        return Err(PairError::Log("outputs still waiting at the end".into()));
    }
    if !writer.is_alone() {
        // Give the backup a moment to report that it replayed everything (not required).
        let deadline = Instant::now() + opts.ack_timeout.min(Duration::from_secs(10));
        while Instant::now() < deadline {
            let s = writer.sender();
            if s.backup_executed_seq() >= end {
                backup_finished = true;
                break;
            }
            if !s.is_running() {
                break;
            }
            drop(s);
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    Ok(PrimaryReport {
        code,
        exits,
        entries: writer.entries(),
        log_bytes: writer.bytes(),
        mem_digest,
        regs_digest,
        elapsed: start.elapsed(),
        outputs: gate.stats(),
        backup_finished,
        log_stalls: writer.stalls(),
        controls: writer.controls().applied(),
        disk_waits: barrier.map(|b| b.waits()),
    })
}

/// Logs every pending control at exit `exit` and applies it (a checkpoint of the primary).
fn log_controls(writer: &LogWriter, exit: u64) -> Result<(), PairError> {
    for (key, value) in writer.controls().take_pending() {
        writer.append(&Entry::Control { exit, key, value })?;
        writer.controls().apply(AppliedControl { exit, key, value });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use ftvm_channel::{GoodbyeReason, LogReceiver, PollerConfig};

    use super::*;
    use crate::bus::EventSignal;
    use crate::devices::virtio::net::{Net, TxMode};

    /// A writer over a real TCP link to a receiver (returned with it).
    fn linked_writer() -> (LogWriter, LogReceiver) {
        let (sender, rx) = super::super::tcp_log_link(PollerConfig {
            core: None,
            idle: IdleKind::Park,
        });
        (LogWriter::new(sender, IdleKind::Yield), rx)
    }

    /// The backup stops as planned while the vCPU is inside a transmit (it holds the net
    /// device's transmit lock and is about to take the sender's lock to log the frames'
    /// digest). The link watch must go alone without holding the sender's lock: it once held
    /// it through `release_alone` (an `if let` temporary), waited for the transmit lock, and
    /// the primary hung — up, alone, answering no client (a lifecycle test failed 1 run in 8).
    #[test]
    fn going_alone_on_a_planned_stop_does_not_deadlock_a_transmitting_vcpu() {
        let (writer, rx) = linked_writer();
        let acks: Arc<dyn super::super::output::AckSource> = writer.sender().shared().clone();
        let gate = Arc::new(OutputGate::start(acks, Arc::clone(writer.position())).expect("gate"));
        let net = Net::new(None, [2, 0, 0, 0, 0, 1], Arc::new(EventSignal::default())).handle();
        gate.gate_net(&net);
        let control = VmControl::detached();
        let mut watch = LinkWatch::start(
            &writer,
            &gate,
            (Some(net.clone()), control),
            (PeerFailurePolicy::Stop, BackupStopPolicy::GoAlone),
        )
        .expect("link watch");
        // The "vCPU": inside the transmit lock, the backup leaves; once the watch decided to go
        // alone, take the sender's lock as a transmit that passed the mode check does.
        let (done_tx, done) = mpsc::channel();
        let (vcpu_writer, vcpu_net) = (writer.clone(), net.clone());
        std::thread::spawn(move || {
            let mode = vcpu_net.tx_mode();
            vcpu_net.switch_tx(mode, || {
                rx.goodbye(GoodbyeReason::PlannedStop, "the backup stops as planned")
                    .expect("goodbye");
                let deadline = Instant::now() + Duration::from_secs(10);
                while !vcpu_writer.is_alone() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(1));
                }
                // Give the watch time to reach the transmit lock.
                std::thread::sleep(Duration::from_millis(50));
                let _logging = vcpu_writer.sender();
            });
            let _ = done_tx.send(());
        });
        if done.recv_timeout(Duration::from_secs(20)).is_err() {
            // Its thread is deadlocked: joining it (the watch's drop) would hang the test.
            std::mem::forget(watch);
            panic!(
                "deadlock: the transmitting vCPU never got the sender's lock (the link watch \
                 held it while waiting for the transmit lock)"
            );
        }
        assert!(writer.is_alone(), "the primary did not go alone");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !matches!(net.tx_mode(), TxMode::Direct) {
            assert!(
                Instant::now() < deadline,
                "transmits never switched to the TAP"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(watch.failure(), None, "a planned stop is no failure");
        watch.stop();
    }
}
