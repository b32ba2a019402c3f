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
//! One owner at each end of the ring: the [`LogAppender`] (the log buffer's producer) is taken
//! once by the run and lent to the VM's [`ChannelRecorder`] while the vCPU runs; every other
//! thread reads the [`LogWriter`], a cloneable handle (positions, counters, mode, the link's
//! [`SenderHandle`]). No lock on the per-entry path.
//!
//! This module holds the pieces of a primary's logging; the run loop that drives them (and
//! calls into the failover side and a join's cut, which build on them) is
//! [`run`](crate::run)'s.
//!
//! What an append does depends on the primary's role ([`super::role`], "The primary"), read
//! with one atomic load per append: LOGGING appends (a full buffer on a dead link fails: no
//! arbiter decides anything else), WATCHED and GOING ALONE append and wait for space while the
//! FT monitor decides, ALONE drops the entry, FENCED and the ended roles fail it. The role
//! lives in the [`LogWriter`] ([`LogWriter::role`]); the `LinkWatch` of a primary without an
//! arbiter steps it to PEER FAILED or ALONE, the FT monitor ([`super::golive`]) to GOING ALONE,
//! ALONE or FENCED. Errors are typed: [`LogWriteError`] (why the log could not be written),
//! [`LinkDown`] (how the link was seen to end), [`SetupError`].
//!
//! Shared-disk mode (the backup names the same image, [`set_shared`](ftvm_vmm_core::devices::virtio::blk::BlkHandle::set_shared)): a disk write
//! is an output. [`DiskBarrier`] holds the vCPU before each write request until the backup has
//! acknowledged every entry logged so far; alone it passes at once, superseded it refuses
//! (the write never reaches the disk and the VM stops).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ftvm_channel::{LogSender, SenderHandle};
use ftvm_ringbuf::{ClaimError, IdleKind, IdleStrategy};

use super::error::PairError;
use super::log::{
    encode_output, encode_read, encode_write, AppliedControl, ControlQueue, Entry, KIND_OUTPUT,
    KIND_READ, KIND_WRITE, OUTPUT_LEN, READ_LEN, WRITE_HEADER_LEN,
};
use super::observe::{DiskWaitsSnapshot, LogSnapshot, Observer, SideRole};
use super::output::{OutputGate, OutputStats};
use super::role::{PrimaryEvent, PrimaryRole, PrimaryRoleCell, PrimaryState};
use super::stop::is_planned;
pub use super::stop::BackupStopPolicy;
pub use crate::error::{LinkDown, LogWriteError, SetupError};
use ftvm_vmm_core::devices::virtio::blk::{BarrierError, BlkHandle, DiskMode, WriteBarrier};
use ftvm_vmm_core::devices::virtio::net::{NetHandle, TxMode};
use ftvm_vmm_core::record::{Inputs, OutputDigest, Recorder};
use ftvm_vmm_core::vm::{Vm, VmControl};

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
    /// Primary without an arbiter ([`run_primary`](crate::run::run_primary)): what to do when
    /// the backup fails.
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

/// The primary's log, seen from any thread: the position written, counters, the primary's
/// role ([`super::role`]: logging, watched, alone, fenced …), controls, the observer, and the
/// link's [`SenderHandle`] (acknowledgements, the poller's state and error, GOODBYE). Cheap to
/// clone.
///
/// One owner at each end of the ring: the log buffer's producer is not here but in the
/// [`LogAppender`], which the run takes once ([`LogWriter::take_appender`]) and lends to the
/// VM's recorder ([`ChannelRecorder`]) while the vCPU runs; the per-entry path (claim, encode,
/// commit, notify) touches only the appender and the atomics below, never a lock. Other threads
/// read positions and counters through this handle.
#[derive(Debug, Clone)]
pub struct LogWriter {
    shared: Arc<WriterShared>,
    /// The appender while no run holds it ([`LogWriter::take_appender`]); touched at the start
    /// and the end of a run, never per entry. (Not in [`WriterShared`], which the appender
    /// holds: that would be a cycle.)
    slot: Arc<Mutex<Option<LogAppender>>>,
    /// The link, for every thread (the appender holds the [`LogSender`] itself).
    link: SenderHandle,
    /// Last sequence number written (shared with the output gate and the throttle's lag).
    position: Arc<AtomicU64>,
    /// Payload bytes logged (shared with the throttle's lag in bytes).
    bytes: Arc<AtomicU64>,
    controls: ControlQueue,
    /// An upper bound on the throttle's share (the join's auto-converge lever).
    cap: crate::share::ShareCap,
    /// The side's live counters ([`super::observe`]).
    observer: Observer,
}

/// What the clones of a [`LogWriter`] and its [`LogAppender`] share.
#[derive(Debug)]
struct WriterShared {
    entries: AtomicU64,
    stalls: AtomicU64,
    stall_ns: AtomicU64,
    /// The primary's role: what an append does (read with one atomic load per append).
    role: PrimaryRoleCell,
    idle: IdleKind,
    /// The first error met by an append through the [`Recorder`] interface (which cannot
    /// fail); written once, on the failure path only.
    error: std::sync::OnceLock<LogWriteError>,
    /// The throttle's pacer, consulted after each append (on the vCPU thread).
    pacer: std::sync::OnceLock<Arc<crate::share::Pacer>>,
}

/// What an append does in each role of the primary ([`super::role`], "The primary").
#[derive(Debug)]
enum AppendMode {
    /// Append; a full buffer on a link that is down fails (nobody decides anything else).
    Log,
    /// Append; a full buffer waits even while the link is down (a monitor decides).
    LogWatched,
    /// Nothing is logged: the append is dropped.
    Drop,
    /// The append fails.
    Fail(LogWriteError),
}

impl AppendMode {
    fn of(role: PrimaryRole) -> Self {
        match role {
            PrimaryRole::Logging => AppendMode::Log,
            PrimaryRole::Watched | PrimaryRole::GoingAlone => AppendMode::LogWatched,
            PrimaryRole::Alone => AppendMode::Drop,
            PrimaryRole::Fenced => AppendMode::Fail(LogWriteError::Fenced),
            PrimaryRole::PeerFailed | PrimaryRole::Stopped => {
                AppendMode::Fail(LogWriteError::Ended)
            }
        }
    }
}

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
    /// A writer over `sender`'s buffer; its appender waits for log space with `idle`.
    pub fn new(sender: LogSender, idle: IdleKind) -> Self {
        Self::with_observer(sender, idle, Observer::new(SideRole::Primary))
    }

    /// As [`LogWriter::new`], registering its counters (and those of everything that watches
    /// this writer: throttle, output gate, detector) with `observer`, an observer the side
    /// already serves: a backup that went live runs as a primary under the same `--metrics`
    /// endpoint and report.
    pub fn with_observer(mut sender: LogSender, idle: IdleKind, observer: Observer) -> Self {
        let position = Arc::new(AtomicU64::new(
            sender.producer().next_seq().saturating_sub(1),
        ));
        let link = sender.handle().clone();
        let shared = Arc::new(WriterShared {
            entries: AtomicU64::new(0),
            stalls: AtomicU64::new(0),
            stall_ns: AtomicU64::new(0),
            role: PrimaryRoleCell::new(PrimaryState::Logging),
            idle,
            error: std::sync::OnceLock::new(),
            pacer: std::sync::OnceLock::new(),
        });
        let writer = LogWriter {
            shared,
            slot: Arc::default(),
            link,
            position,
            bytes: Arc::default(),
            controls: ControlQueue::new(),
            cap: crate::share::ShareCap::default(),
            observer,
        };
        let appender = LogAppender::new(sender, &writer);
        *writer.lock_appender() = Some(appender);
        // The counters only, never a clone of the writer: the observer lives in the writer, and
        // a writer in its closure would keep the appender's LogSender (and so the link) alive
        // after the last user dropped the writer — the backup then waited 30 s for the hang-up.
        let (shared, position, bytes) = (
            Arc::clone(&writer.shared),
            Arc::clone(&writer.position),
            Arc::clone(&writer.bytes),
        );
        let acks = Arc::clone(writer.link.shared());
        writer.observer.set_log(move || {
            let s = LogStalls::read(&shared.stalls, &shared.stall_ns);
            LogSnapshot {
                written: position.load(Ordering::Acquire),
                sent: Some(acks.sent_seq()),
                acked: acks.acked_seq(),
                executed: acks.executed_seq(),
                entries: shared.entries.load(Ordering::Relaxed),
                bytes: Some(bytes.load(Ordering::Relaxed)),
                stalls: s.count,
                stall_ms: super::observe::ms(s.time),
            }
        });
        let chan = Arc::clone(writer.link.shared());
        writer.observer.set_channel(move || chan.stats.snapshot());
        writer
    }

    fn lock_appender(&self) -> std::sync::MutexGuard<'_, Option<LogAppender>> {
        self.slot.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes the appender (the log buffer's producer) for a run: one run at a time appends.
    ///
    /// # Errors
    /// [`PairError::Setup`] if a run holds it already.
    pub fn take_appender(&self) -> Result<LogAppender, PairError> {
        self.lock_appender()
            .take()
            .ok_or(PairError::Setup(SetupError::AppenderTaken))
    }

    /// Gives the appender back at the end of a run (the link stays up as long as a clone of
    /// this writer holds it).
    pub fn return_appender(&self, appender: LogAppender) {
        *self.lock_appender() = Some(appender);
    }

    /// The side's live counters: the log, the channel, and what the run registers (exits,
    /// outputs, throttle, detector, disk waits).
    pub fn observer(&self) -> &Observer {
        &self.observer
    }

    /// Sleeps the pacer made the vCPU take and their total (zero without a throttle).
    pub fn pacer_sleeps(&self) -> (u64, Duration) {
        self.shared
            .pacer
            .get()
            .map_or((0, Duration::ZERO), |p| p.slept())
    }

    /// The bound on the vCPU's CPU share that a throttle started for this writer
    /// ([`super::throttle::Throttle::for_writer`]) obeys; a join lowers it to make pre-copy
    /// converge ([`super::join`], auto-converge).
    pub fn share_cap(&self) -> &crate::share::ShareCap {
        &self.cap
    }

    /// Paces the vCPU thread at its appends with `pacer` (the throttle's pause actuator,
    /// [`super::throttle::pace`]). Only the first pacer set is used.
    pub fn set_pacer(&self, pacer: Arc<crate::share::Pacer>) {
        let _ = self.shared.pacer.set(pacer);
    }

    /// The primary's role ([`super::role`]): every change of it goes through
    /// [`RoleCell::step`](super::role::RoleCell::step).
    pub fn role(&self) -> &PrimaryRoleCell {
        &self.shared.role
    }

    /// Applies `event` to the primary's role, logging a refused transition (a caller that may
    /// meet one on purpose uses [`LogWriter::role`]).
    pub(crate) fn step(&self, event: PrimaryEvent) -> bool {
        match self.shared.role.step(event) {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(error = %e, "primary role: transition refused");
                false
            }
        }
    }

    /// The run ended: the primary's role becomes STOPPED, unless it ended FENCED or PEER
    /// FAILED (which say why). A writer serves one run.
    pub(crate) fn end_run(&self) {
        let role = self.shared.role.role();
        if !matches!(
            role,
            PrimaryRole::Fenced | PrimaryRole::PeerFailed | PrimaryRole::Stopped
        ) {
            self.step(PrimaryEvent::Stop);
        }
    }

    /// The counter of log payload bytes written (for the lag in bytes).
    pub fn bytes_counter(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.bytes)
    }

    /// Whether logging stopped because the primary runs alone.
    pub fn is_alone(&self) -> bool {
        self.shared.role.is(PrimaryRole::Alone)
    }

    /// The queue of controls logged and applied at the next checkpoint of the primary's run
    /// ([`run_primary`](crate::run::run_primary); see [`ControlQueue`]).
    pub fn controls(&self) -> &ControlQueue {
        &self.controls
    }

    /// How often and how long appends waited for log space so far.
    pub fn stalls(&self) -> LogStalls {
        LogStalls::read(&self.shared.stalls, &self.shared.stall_ns)
    }

    /// The link (acks, counters, the poller's state, GOODBYE).
    pub fn sender(&self) -> &SenderHandle {
        &self.link
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
        self.shared.entries.load(Ordering::Relaxed)
    }

    /// The first error met by a write through the [`Recorder`] interface (which cannot fail).
    pub fn error(&self) -> Option<LogWriteError> {
        self.shared.error.get().cloned()
    }
}

/// The primary's end of the log buffer: the one owner of the [`LogSender`] and its producer.
/// Taken from the [`LogWriter`] by the run, lent to the VM's [`ChannelRecorder`] while the
/// vCPU runs and taken back between runs for the checkpoint entries.
#[derive(Debug)]
pub struct LogAppender {
    sender: LogSender,
    /// The writer's counters and mode.
    shared: Arc<WriterShared>,
    /// The writer's position and bytes logged.
    position: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
    /// Largest data chunk of one `Write` entry.
    chunk: usize,
}

impl LogAppender {
    fn new(mut sender: LogSender, writer: &LogWriter) -> Self {
        let max = sender.producer().ring().max_payload();
        LogAppender {
            sender,
            shared: Arc::clone(&writer.shared),
            position: Arc::clone(&writer.position),
            bytes: Arc::clone(&writer.bytes),
            chunk: max.saturating_sub(WRITE_HEADER_LEN).clamp(1, 64 << 10),
        }
    }

    fn mode(&self) -> AppendMode {
        AppendMode::of(self.shared.role.role())
    }

    /// The sequence number the next entry gets.
    pub(crate) fn next_seq(&mut self) -> u64 {
        self.sender.producer().next_seq()
    }

    /// Claims `len` bytes of `kind`, lets `fill` encode in place, commits; waits (with the idle
    /// strategy) while the buffer is full and the link is up. Returns the sequence number.
    fn append_with(
        &mut self,
        kind: u16,
        len: usize,
        fill: impl Fn(&mut [u8]),
    ) -> Result<u64, LogWriteError> {
        let mut idle = None;
        let mut stalled: Option<Instant> = None;
        loop {
            match self.mode() {
                AppendMode::Drop => return Ok(self.position.load(Ordering::Acquire)),
                AppendMode::Fail(e) => return Err(e),
                AppendMode::Log | AppendMode::LogWatched => {}
            }
            match self.sender.producer().claim(kind, len) {
                Ok(mut claim) => {
                    fill(&mut claim);
                    let seq = claim.commit();
                    self.sender.notify(seq);
                    debug_assert!(
                        seq > self.position.load(Ordering::Relaxed),
                        "log positions only increase"
                    );
                    self.position.store(seq, Ordering::Release);
                    self.bytes.fetch_add(len as u64, Ordering::Relaxed);
                    let s = &self.shared;
                    s.entries.fetch_add(1, Ordering::Relaxed);
                    if let Some(t) = stalled {
                        s.stalls.fetch_add(1, Ordering::Relaxed);
                        s.stall_ns
                            .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
                    }
                    if let Some(p) = s.pacer.get() {
                        p.pace();
                    }
                    return Ok(seq);
                }
                Err(ClaimError::Full { .. }) => {
                    stalled.get_or_insert_with(Instant::now);
                }
                Err(e) => return Err(LogWriteError::Claim(e)),
            }
            if !self.sender.is_running() && matches!(self.mode(), AppendMode::Log) {
                let why = LinkDown::from_error(self.sender.error());
                return Err(LogWriteError::FullAndLinkDown(why));
            }
            idle.get_or_insert_with(|| self.shared.idle.build()).idle(0);
        }
    }

    /// Appends one entry.
    ///
    /// # Errors
    /// [`PairError::Log`].
    pub fn append(&mut self, entry: &Entry) -> Result<u64, PairError> {
        self.append_with(entry.kind(), entry.encoded_len(), |p| entry.encode(p))
            .map_err(PairError::Log)
    }

    fn fail(&self, e: LogWriteError) {
        tracing::error!(error = %e, "cannot log an input");
        let _ = self.shared.error.set(e);
    }
}

/// The [`Recorder`] of a primary: every input becomes an entry of the log, appended by the
/// [`LogAppender`] the recorder owns while it is installed in the VM.
#[derive(Debug)]
pub struct ChannelRecorder {
    appender: LogAppender,
    /// The exit index of the last entry: indices never go back (the backup replays entries in
    /// log order against its own exit count). Checked with `assert!`: one compare per entry.
    last_exit: u64,
}

impl ChannelRecorder {
    /// A recorder appending with `appender`.
    pub fn new(appender: LogAppender) -> Self {
        ChannelRecorder {
            appender,
            last_exit: 0,
        }
    }

    /// Notes an entry of exit `exit`.
    fn at(&mut self, exit: u64) {
        assert!(
            exit >= self.last_exit,
            "exit indices only increase: {exit} after {}",
            self.last_exit
        );
        self.last_exit = exit;
    }

    /// The appender, back to the run (the recorder is done).
    pub fn into_appender(self) -> LogAppender {
        self.appender
    }
}

impl Recorder for ChannelRecorder {
    fn external_read(&mut self, exit: u64, addr: u64, value: u64) {
        self.at(exit);
        let r = self
            .appender
            .append_with(KIND_READ, READ_LEN, |p| encode_read(p, exit, addr, value));
        if let Err(e) = r {
            self.appender.fail(e);
        }
    }

    fn output(&mut self, exit: u64, out: &OutputDigest) {
        // Logged before the device tags the output: the digest's position is at most the
        // output's tag, so an output is released only once the backup holds its digest.
        self.at(exit);
        let r = self
            .appender
            .append_with(KIND_OUTPUT, OUTPUT_LEN, |p| encode_output(p, exit, out));
        if let Err(e) = r {
            self.appender.fail(e);
        }
    }

    fn wants_outputs(&self) -> bool {
        true
    }

    fn guest_write(&mut self, exit: u64, gpa: u64, data: &[u8]) {
        self.at(exit);
        let chunk = self.appender.chunk;
        for (i, piece) in data.chunks(chunk).enumerate() {
            let at = gpa + (i * chunk) as u64;
            let r = self
                .appender
                .append_with(KIND_WRITE, WRITE_HEADER_LEN + piece.len(), |p| {
                    encode_write(p, exit, at, piece)
                });
            if let Err(e) = r {
                self.appender.fail(e);
                return;
            }
        }
    }

    fn as_any_mut(&mut self) -> Option<&mut dyn std::any::Any> {
        Some(self)
    }

    fn into_any(self: Box<Self>) -> Option<Box<dyn std::any::Any>> {
        Some(self)
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
    control: std::sync::OnceLock<ftvm_vmm_core::vm::VmControl>,
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

    /// Gates the writes of `vm`'s shared disk `disk` on `writer`'s acknowledgements (a write
    /// waiting while `vm` is asked to stop on a dead link gives up) and shows the waits in
    /// `writer`'s observer.
    pub(crate) fn install(writer: &LogWriter, vm: &Vm, disk: &BlkHandle) -> Arc<Self> {
        let b = Arc::new(DiskBarrier::new(writer));
        let _ = b.control.set(vm.control());
        disk.set_mode(DiskMode::Gated(b.clone()));
        let waits = Arc::clone(&b.waits);
        writer.observer().set_disk_waits(move || {
            let w = *waits.lock().unwrap_or_else(|e| e.into_inner());
            DiskWaitsSnapshot {
                writes: w.writes,
                waited: w.waited,
                time_ms: super::observe::ms(w.time),
                max_ms: super::observe::ms(w.max),
                alone: w.alone,
            }
        });
        b
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
    fn before_write(&self) -> Result<(), BarrierError> {
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
            let role = self.writer.role().role();
            match role {
                PrimaryRole::Alone => {
                    self.count(started, true);
                    return Ok(());
                }
                PrimaryRole::Fenced => return Err(BarrierError::Superseded),
                // Nobody will acknowledge anything any more.
                PrimaryRole::PeerFailed | PrimaryRole::Stopped => {
                    return Err(BarrierError::NeverAcknowledged { position: target })
                }
                PrimaryRole::Logging | PrimaryRole::Watched | PrimaryRole::GoingAlone => {}
            }
            if self.acks.acked_seq() >= target {
                self.count(started, false);
                return Ok(());
            }
            started.get_or_insert_with(Instant::now);
            polls += 1;
            if polls > BARRIER_SPINS + BARRIER_YIELDS
                && polls % 64 == 0
                && (role == PrimaryRole::Logging
                    || self.control.get().is_some_and(|c| c.stop_requested()))
                && !self.writer.sender().is_running()
            {
                return Err(BarrierError::NeverAcknowledged { position: target });
            }
            idle.idle(0);
        }
    }
}

/// Watches the logging link of a primary **without an arbiter** and applies its
/// [`PeerFailurePolicy`] when the link breaks (the backup failed): the primary's role goes
/// from LOGGING to PEER FAILED or ALONE ([`super::role`]). A thread that looks every
/// [`LINK_WATCH_EVERY`] and sleeps in between (no spinning); stopped when the run ends.
pub(crate) struct LinkWatch {
    /// Ends the watching thread (the run ended); not a role.
    stop: Arc<std::sync::atomic::AtomicBool>,
    role: PrimaryRoleCell,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// How often [`LinkWatch`] looks at the link.
const LINK_WATCH_EVERY: Duration = Duration::from_millis(5);

impl LinkWatch {
    /// Watches `writer`'s link; going alone releases `gate` and switches `net` to direct
    /// transmits, stopping kicks the VM through `control`.
    pub(crate) fn start(
        writer: &LogWriter,
        gate: &Arc<OutputGate>,
        (net, control): (Option<NetHandle>, VmControl),
        (policy, on_stop): (PeerFailurePolicy, BackupStopPolicy),
    ) -> Result<Self, PairError> {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let role = writer.role().clone();
        let (writer, gate) = (writer.clone(), Arc::clone(gate));
        let stop2 = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("ft-link-watch".into())
            .spawn(move || {
                while !stop2.load(Ordering::Acquire) {
                    // Read into locals before anything below takes the net device's transmit
                    // lock (`release_alone`). The link handle takes no lock that a vCPU holds;
                    // when the sender was a `Mutex` (before the appender had one owner), an
                    // `if let` temporary held its lock through `release_alone` while a
                    // transmitting vCPU waited for it: the primary deadlocked, alone.
                    let (why, goodbye) = {
                        let s = writer.sender();
                        if s.is_running() {
                            (None, None)
                        } else {
                            (Some(LinkDown::from_error(s.error())), s.peer_goodbye())
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
                                writer.step(PrimaryEvent::RunAlone);
                                release_alone(&gate, net.as_ref(), 1);
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
                            writer.step(PrimaryEvent::PeerFailed(why));
                            control.kick();
                        }
                        PeerFailurePolicy::GoAloneUnprotected => {
                            tracing::warn!(
                                %why,
                                "UNPROTECTED: the backup failed and there is no arbiter; this \
                                 primary goes on ALONE as asked (--go-alone-unprotected): no \
                                 backup, no failover, held outputs released now"
                            );
                            writer.step(PrimaryEvent::RunAlone);
                            release_alone(&gate, net.as_ref(), 1);
                        }
                    }
                    return;
                }
            })
            .map_err(SetupError::thread("link watch"))?;
        Ok(LinkWatch {
            stop,
            role,
            thread: Some(thread),
        })
    }

    /// Why the backup is taken for failed, once the link broke under [`PeerFailurePolicy::Stop`].
    pub(crate) fn failure(&self) -> Option<LinkDown> {
        match self.role.state() {
            PrimaryState::PeerFailed(why) => Some(why),
            _ => None,
        }
    }

    /// Stops watching (the run ended: the link going down now is no failure).
    pub(crate) fn stop(&mut self) {
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

/// How long going alone waits for the held outputs to be released.
pub(crate) const RELEASE_TIMEOUT: Duration = Duration::from_secs(10);

/// A primary that went ALONE (its role says so already: nothing is logged) in `generation`:
/// every held output is released (the frames held before transmits switch to the TAP leave
/// first, in order), transmits go straight to the TAP. Returns whether everything held was
/// released in time. (With an arbiter the FT monitor goes alone, [`super::golive`]; without
/// one the [`LinkWatch`].)
pub(crate) fn release_alone(gate: &OutputGate, net: Option<&NetHandle>, generation: u64) -> bool {
    gate.release_all(generation);
    let mut released = false;
    match net {
        Some(net) => net.switch_tx(TxMode::Direct, || {
            released = gate.flush(RELEASE_TIMEOUT);
        }),
        None => released = gate.flush(RELEASE_TIMEOUT),
    }
    if !released {
        tracing::error!("held outputs could not all be released");
    }
    released
}

/// Test hooks of a primary run (deliberate nondeterminism).
#[derive(Debug, Default, Clone)]
pub struct PrimaryHooks {
    /// At this checkpoint number, write bytes into guest memory at this address without logging
    /// them (as if the VMM had handed the guest uninitialised host data).
    pub unlogged_write: Option<(u64, u64, Vec<u8>)>,
}

/// The appender of a primary run: in the run loop's hands (`parked`), or lent to the VM's
/// [`ChannelRecorder`] while the vCPU runs (taken back through the VM between two runs). Given
/// back to the writer when the run ends.
pub(crate) struct Lent {
    writer: LogWriter,
    parked: Option<LogAppender>,
}

impl Lent {
    /// Takes `writer`'s appender for a run.
    pub(crate) fn take(writer: &LogWriter) -> Result<Self, PairError> {
        Ok(Lent {
            writer: writer.clone(),
            parked: Some(writer.take_appender()?),
        })
    }

    /// Installs the appender in `vm`'s recorder: the vCPU logs every input from now on.
    pub(crate) fn lend(&mut self, vm: &mut Vm) {
        if let Some(a) = self.parked.take() {
            vm.set_inputs(Inputs::Live(Box::new(ChannelRecorder::new(a))));
        }
    }

    /// Takes the appender back from `vm`, whose inputs become live without a recorder.
    pub(crate) fn take_back(&mut self, vm: &mut Vm) {
        if let Some(r) = vm.take_recorder::<ChannelRecorder>() {
            self.parked = Some(r.into_appender());
        }
        vm.set_inputs(Inputs::default());
    }

    /// The appender, wherever it is.
    pub(crate) fn get<'a>(&'a mut self, vm: &'a mut Vm) -> Result<&'a mut LogAppender, PairError> {
        match self.parked.as_mut() {
            Some(a) => Ok(a),
            None => vm
                .recorder_mut::<ChannelRecorder>()
                .map(|r| &mut r.appender)
                .ok_or(PairError::Setup(SetupError::RecorderGone)),
        }
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        if let Some(a) = self.parked.take() {
            self.writer.return_appender(a);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use ftvm_channel::{GoodbyeReason, LogReceiver, PollerConfig};

    use super::*;
    use ftvm_vmm_core::bus::EventSignal;
    use ftvm_vmm_core::devices::virtio::net::{Net, TxMode};

    /// A writer over a real TCP link to a receiver (returned with it).
    fn linked_writer() -> (LogWriter, LogReceiver) {
        let (sender, rx) = ftvm_testkit::link::TcpLink::new()
            .ring(1 << 16)
            .mode(ftvm_channel::tcp::TcpMode::Blocking)
            .poller(PollerConfig {
                core: None,
                idle: IdleKind::Park,
            })
            .start(Default::default());
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
        assert!(watch.failure().is_none(), "a planned stop is no failure");
        watch.stop();
    }
}
