//! The backup: replays the primary's log. The vCPU runs until its next exit and takes the
//! entries logged for that exit, which must match it (exit index, kind, device and address);
//! it never runs past the last entry it has: at the end of every exit it waits until it holds
//! an entry of a later exit (so it stays one entry behind the primary). At every checkpoint
//! it compares its register (and memory) digest with the primary's; any difference stops the
//! replay with `diverged at exit N: <what differed>`.
//!
//! Output-verified replay: every output the backup's devices produce (and drop) is digested
//! at the exit that produced it and compared with the digest the primary logged there
//! ([`Entry::Output`]); a difference, an output the primary did not produce, or one the
//! backup did not, stops the replay with `diverged at exit N: output …` (counted in
//! [`OutputChecks`]). A guest instruction whose result nobody logged (RDRAND, RDTSC where the
//! host does not trap them: `guests/README.md`) is caught this way at the first output it
//! influences, not thousands of exits later at a register checkpoint. A diverged backup can no
//! longer take over: its state is not the primary's, so it must never go live
//! (`ft::golive`, "A backup that diverged").
//!
//! Shared-disk mode (the primary and the backup name the same image): while it replays, the
//! backup's virtio-blk device does not touch the disk (read data come from the log, writes are
//! dropped and counted: [`DiskMode::Replay`]); the disk becomes the backup's when it goes live
//! ([`super::golive`]).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ftvm_channel::{GoodbyeReason, LogReceiver, TransportError};
use ftvm_ringbuf::IdleKind;

use super::detector::TrafficNote;
use super::digest::register_digest;
use super::log::{device_name, AppliedControl, ControlQueue, Entry};
use super::observe::{LogSnapshot, Observer, SideRole};
use super::primary::PairError;
use super::stop::{is_planned, StopCause, Stopped};
use crate::devices::virtio::blk::{BlkCounters, BlkHandle, DiskMode};
use crate::record::{Inputs, OutputDigest, ReplayError, ReplaySource};
use crate::vm::{RunOutcome, Vm};

/// With [`IdleKind::Park`], empty polls of the log before the replaying vCPU sleeps until the
/// receiver delivers (a poll is ~50 ns: a few tens of microseconds of spinning).
const PARK_AFTER_POLLS: u32 = 500;

/// A hook that may alter an entry as it is received (tests: a corrupted entry).
pub type Tamper = Box<dyn FnMut(u64, &mut Entry) + Send>;

/// Reads entries from the receiver's log buffer, blocking with an idle strategy.
pub struct LogReader {
    rx: LogReceiver,
    pending: VecDeque<(u64, Entry)>,
    idle: IdleKind,
    tamper: Option<Tamper>,
    divergence: Option<(u64, String)>,
    consumed: u64,
    waited: Duration,
    controls: ControlQueue,
    watch: Option<Watch>,
    observer: Observer,
    checks: OutputChecks,
    /// The replaying VM's control: a stop requested there ends the wait for entries
    /// ([`super::stop`]).
    stop: Option<crate::vm::VmControl>,
}

/// The output verification of a backup: how many of the primary's output digests its own
/// outputs matched, and how many did not (the first mismatch ends the replay with
/// `diverged at exit N: output …`, so at most one). Cheap to clone (shared): take it from the
/// [`LogReader`] before the run, read it after, whatever the run's outcome.
#[derive(Debug, Clone, Default)]
pub struct OutputChecks(Arc<OutputCounters>);

#[derive(Debug, Default)]
struct OutputCounters {
    verified: AtomicU64,
    bytes: AtomicU64,
    mismatches: AtomicU64,
}

impl OutputChecks {
    fn verified(&self, out: &OutputDigest) {
        self.0.verified.fetch_add(1, Ordering::Relaxed);
        self.0.bytes.fetch_add(out.bytes, Ordering::Relaxed);
    }

    fn mismatch(&self) {
        self.0.mismatches.fetch_add(1, Ordering::Relaxed);
    }

    /// Output digests the backup's outputs matched.
    pub fn verified_count(&self) -> u64 {
        self.0.verified.load(Ordering::Relaxed)
    }

    /// Bytes of output those digests covered.
    pub fn verified_bytes(&self) -> u64 {
        self.0.bytes.load(Ordering::Relaxed)
    }

    /// Outputs that differed from the primary's (or had no counterpart).
    pub fn mismatches(&self) -> u64 {
        self.0.mismatches.load(Ordering::Relaxed)
    }
}

/// What a [`LogReader`] of a fault-tolerant backup watches besides the link.
struct Watch {
    /// The failure detector presumes the primary failed.
    peer_failed: Arc<AtomicBool>,
    /// Reports log traffic to the failure detector.
    traffic: TrafficNote,
    /// The receiver was stopped (no more records are received or acknowledged).
    severed: bool,
    /// When the log was first seen to stop (link error, or the primary presumed failed).
    lost_at: Option<Instant>,
}

/// A transport that is closed: handing it to [`LogReceiver::reconnect`] stops the receiver's
/// poller (its handshake fails at once), so that nothing more is received or acknowledged.
struct Severed;

impl ftvm_channel::Transport for Severed {
    fn name(&self) -> &'static str {
        "severed"
    }
    fn max_frame(&self) -> usize {
        1 << 16
    }
    fn send(&mut self, _frame: &[u8]) -> Result<bool, ftvm_channel::TransportError> {
        Err(ftvm_channel::TransportError::Closed { mid_frame: false })
    }
    fn flush(&mut self) -> Result<(), ftvm_channel::TransportError> {
        Ok(())
    }
    fn poll_recv(
        &mut self,
        _on_frame: &mut dyn FnMut(&[u8]),
    ) -> Result<usize, ftvm_channel::TransportError> {
        Err(ftvm_channel::TransportError::Closed { mid_frame: false })
    }
}

impl std::fmt::Debug for LogReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogReader")
            .field("pending", &self.pending.len())
            .field("consumed", &self.consumed)
            .finish_non_exhaustive()
    }
}

impl LogReader {
    /// A reader over `rx`.
    pub fn new(rx: LogReceiver, idle: IdleKind, tamper: Option<Tamper>) -> Self {
        let observer = Observer::new(SideRole::Backup);
        let shared = Arc::clone(rx.shared());
        let s = Arc::clone(&shared);
        observer.set_log(move || LogSnapshot {
            written: s.received_seq(),
            sent: None,
            acked: s.received_seq(),
            executed: s.executed_seq(),
            entries: s.stats.snapshot().records_delivered,
            ..Default::default()
        });
        observer.set_channel(move || shared.stats.snapshot());
        LogReader {
            rx,
            pending: VecDeque::new(),
            idle,
            tamper,
            divergence: None,
            consumed: 0,
            waited: Duration::ZERO,
            controls: ControlQueue::new(),
            watch: None,
            observer,
            checks: OutputChecks::default(),
            stop: None,
        }
    }

    /// The side's live counters: the log, the channel, and what the run registers (exits,
    /// detector, outputs once live).
    pub fn observer(&self) -> &Observer {
        &self.observer
    }

    /// The output verification counters (shared).
    pub fn output_checks(&self) -> OutputChecks {
        self.checks.clone()
    }

    /// Fault tolerance: while waiting for entries, stop waiting once `peer_failed` is set (the
    /// failure detector presumes the primary failed): the receiver is then stopped (nothing more
    /// is received or acknowledged), the entries it holds are handed out, and the log ends
    /// ([`ReplayError::Exhausted`]). Each batch of records received is noted on `traffic`.
    pub(crate) fn watch(&mut self, peer_failed: Arc<AtomicBool>, traffic: TrafficNote) {
        self.watch = Some(Watch {
            peer_failed,
            traffic,
            severed: false,
            lost_at: None,
        });
    }

    /// When the log was first seen to stop (with [`LogReader::watch`]).
    pub(crate) fn lost_at(&self) -> Option<Instant> {
        self.watch.as_ref().and_then(|w| w.lost_at)
    }

    /// Stops the receiver: nothing more is received or acknowledged; what it holds can still be
    /// read. Returns whether it was running.
    pub(crate) fn sever(&mut self) -> bool {
        let was = self.rx.is_running();
        // The handshake over a closed transport fails at once and leaves the poller stopped.
        let _ = self.rx.reconnect(Box::new(Severed));
        if let Some(w) = self.watch.as_mut() {
            w.severed = true;
            w.lost_at.get_or_insert_with(Instant::now);
        }
        was
    }

    /// Entries consumed so far.
    pub fn consumed(&self) -> u64 {
        self.consumed
    }

    /// The controls the backup applies where the primary logged them (set a handler with
    /// [`ControlQueue::on_apply`] before the run; read [`ControlQueue::applied`] after).
    pub fn controls(&self) -> &ControlQueue {
        &self.controls
    }

    /// The receiver (counters).
    pub fn receiver(&self) -> &LogReceiver {
        &self.rx
    }

    /// Moves every record received so far into `pending`, decoded; `Ok(Err(e))` once the link
    /// ended (`e`) and every record received before was handed out.
    fn receive(&mut self, exit: u64) -> Result<Result<usize, TransportError>, ReplayError> {
        let mut bad = None;
        let pending = &mut self.pending;
        let tamper = &mut self.tamper;
        let r = self
            .rx
            .poll_records(|rec| match Entry::decode(rec.kind(), rec.payload()) {
                Ok(mut e) => {
                    if let Some(t) = tamper.as_mut() {
                        t(rec.seq(), &mut e);
                    }
                    pending.push_back((rec.seq(), e));
                }
                Err(e) => {
                    bad.get_or_insert((rec.seq(), e));
                }
            });
        if let Some((seq, e)) = bad {
            return Err(self.diverged(exit, format!("log record {seq} is not an entry: {e}")));
        }
        if let (Ok(n), Some(w)) = (&r, &self.watch) {
            if *n > 0 {
                w.traffic.note();
            }
        }
        Ok(r)
    }

    /// Between two exits ([`ReplaySource::between_exits`]): `Err(Exhausted)` when the log has
    /// nothing more for this run — the primary is presumed failed, the receiver is stopped
    /// (here, if it was not yet), and no entry is left. Entries still pending belong to later
    /// exits, which the vCPU reaches by replaying on (it then decides at one of them).
    pub(crate) fn between_exits(&mut self, exit: u64) -> Result<(), ReplayError> {
        let Some(w) = &self.watch else {
            return Ok(());
        };
        if !self.pending.is_empty() || !w.peer_failed.load(Ordering::Acquire) {
            return Ok(());
        }
        if !w.severed {
            tracing::warn!(
                exit,
                "the primary is presumed failed while the vCPU runs between exits: stopping \
                 the log receiver"
            );
            self.sever();
        }
        // What the receiver held when it stopped.
        let _ = self.receive(exit)?;
        if self.pending.is_empty() {
            Err(ReplayError::Exhausted { exit })
        } else {
            Ok(())
        }
    }

    /// Waits until at least one entry is pending.
    fn fill(&mut self, exit: u64) -> Result<(), ReplayError> {
        if !self.pending.is_empty() {
            return Ok(());
        }
        let mut idle = self.idle.build();
        let mut spins = 0u32;
        let started = Instant::now();
        loop {
            match self.receive(exit)? {
                Ok(n) if n > 0 => break,
                Ok(_) => {
                    let failed = self
                        .watch
                        .as_ref()
                        .is_some_and(|w| !w.severed && w.peer_failed.load(Ordering::Acquire));
                    if failed {
                        tracing::warn!(
                            exit,
                            "the primary is presumed failed: stopping the log receiver"
                        );
                        self.sever();
                    } else if self.stop.as_ref().is_some_and(|c| c.stop_requested()) {
                        // A planned stop of this backup: the replay ends here (the run's
                        // driver sees the request and does not go live).
                        return Err(ReplayError::Exhausted { exit });
                    } else if self.idle == IdleKind::Park {
                        // Spin a little (the next entry is often microseconds away), then
                        // sleep until the receiver delivers: a spinning backup vCPU takes the
                        // CPU from the pollers and the primary when they share cores.
                        spins += 1;
                        if spins < PARK_AFTER_POLLS {
                            std::hint::spin_loop();
                        } else {
                            self.rx.wait_for_records(Duration::from_millis(1));
                        }
                    } else {
                        idle.idle(0);
                    }
                }
                Err(e) => {
                    if let Some(w) = self.watch.as_mut() {
                        w.lost_at.get_or_insert_with(Instant::now);
                    }
                    tracing::warn!(error = %e, exit, "log ended");
                    return Err(ReplayError::Exhausted { exit });
                }
            }
        }
        self.waited += started.elapsed();
        Ok(())
    }

    /// Tells the primary that this backup leaves the pair, and why (a GOODBYE frame); if it
    /// cannot be told (the link is gone already), it will notice the silence.
    pub(crate) fn goodbye(&mut self, reason: GoodbyeReason, text: &str) -> bool {
        match self.rx.goodbye(reason, text) {
            Ok(()) => {
                tracing::warn!(%reason, "told the primary that this backup leaves the pair");
                true
            }
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    %reason,
                    "could not tell the primary that this backup leaves the pair; its failure \
                     detector will notice"
                );
                false
            }
        }
    }

    /// A planned stop that ends this backup's replay at `exit`, if one applies
    /// ([`super::stop`]): its VM was asked to stop, or the primary said GOODBYE `PlannedStop`.
    fn planned_stop(&self, exit: u64) -> Option<PairError> {
        let cause = if self.stop.as_ref().is_some_and(|c| c.stop_requested()) {
            StopCause::Requested
        } else {
            StopCause::PeerStopped(self.rx.peer_goodbye().filter(is_planned)?.text)
        };
        Some(PairError::Stopped(Stopped {
            exit,
            cause,
            held: 0,
            told_peer: false,
        }))
    }

    /// After the End entry: keeps the link (and the acks) up until the primary hangs up, at
    /// most `timeout`, so that the primary sees its last entries acknowledged.
    pub fn linger(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            match self.rx.poll_records(|_| {}) {
                Err(_) => return,
                Ok(_) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
        tracing::warn!("the primary did not hang up after the end of the log");
    }

    fn diverged(&mut self, exit: u64, what: String) -> ReplayError {
        tracing::error!(exit, %what, "diverged");
        self.divergence.get_or_insert((exit, what.clone()));
        ReplayError::Diverged { exit, what }
    }

    fn consume(&mut self, seq: u64) {
        self.consumed += 1;
        self.rx.report_executed(seq);
    }

    /// Takes the next entry (blocking).
    ///
    /// # Errors
    /// [`ReplayError::Exhausted`] when the log ended.
    pub fn next_entry(&mut self, exit: u64) -> Result<Entry, ReplayError> {
        self.fill(exit)?;
        match self.pending.pop_front() {
            Some((seq, e)) => {
                self.consume(seq);
                Ok(e)
            }
            None => Err(ReplayError::Exhausted { exit }),
        }
    }

    /// The index among the pending entries of the first entry of exit `exit` that is not a
    /// `Write` (the writes of an exit are applied at its end, and the live run logs them as the
    /// devices make them, so they may come before the exit's read or output digest); waits
    /// while only writes of this exit are pending. `Err(description)` of the next entry when
    /// the log goes on with another exit (or a header) instead.
    fn next_event(&mut self, exit: u64) -> Result<Result<usize, String>, ReplayError> {
        loop {
            self.fill(exit)?;
            let mut found = None;
            for (i, (_, e)) in self.pending.iter().enumerate() {
                if e.exit() != exit || matches!(e, Entry::Header { .. }) {
                    found = Some(Err(format!("{e:?}")));
                    break;
                }
                if !matches!(e, Entry::Write { .. }) {
                    found = Some(Ok(i));
                    break;
                }
            }
            match found {
                Some(r) => return Ok(r),
                // Only writes of this exit so far: wait for more.
                None => {
                    let n = self.pending.len();
                    self.fetch_more(exit, n)?;
                }
            }
        }
    }

    /// Removes pending entry `i` and reports it executed.
    fn take_pending(&mut self, i: usize) {
        if let Some((seq, _)) = self.pending.remove(i) {
            self.consume(seq);
        }
    }

    fn read(&mut self, exit: u64, addr: u64) -> Result<u64, ReplayError> {
        let next = match self.next_event(exit)? {
            Ok(i) => match self.pending.get(i) {
                Some((_, Entry::Read { addr: a, value, .. })) => {
                    let (a, value) = (*a, *value);
                    if a != addr {
                        return Err(self.diverged(
                            exit,
                            format!(
                                "the backup read {addr:#x} ({}) but the primary read {a:#x} ({})",
                                device_name(addr),
                                device_name(a)
                            ),
                        ));
                    }
                    self.take_pending(i);
                    return Ok(value);
                }
                Some((_, e)) => format!("{e:?}"),
                None => String::new(),
            },
            Err(next) => next,
        };
        Err(self.diverged(
            exit,
            format!(
                "unexpected exit: the backup read {addr:#x} ({}), the primary logged no read here (next entry: {next})",
                device_name(addr)
            ),
        ))
    }

    /// The backup produced the outputs digested in `out` at exit `exit`: the primary's log
    /// must have the same digest here (see [`OutputChecks`]).
    fn output(&mut self, exit: u64, out: &OutputDigest) -> Result<(), ReplayError> {
        let what = match self.next_event(exit)? {
            Ok(i) => match self.pending.get(i) {
                Some((_, Entry::Output { digest, .. })) if digest == out => {
                    self.take_pending(i);
                    self.checks.verified(out);
                    return Ok(());
                }
                Some((_, Entry::Output { digest, .. })) => {
                    let theirs = *digest;
                    self.take_pending(i);
                    let of = if theirs.source == out.source {
                        String::new()
                    } else {
                        format!(" (of {})", theirs.source.name())
                    };
                    format!(
                        "output of {} differs: the backup's is {out}, the primary's{of} {theirs}",
                        out.source.name(),
                    )
                }
                Some((_, e)) => format!(
                    "output of {} by the backup ({out}), the primary logged no output here (next entry: {e:?})",
                    out.source.name()
                ),
                None => String::new(),
            },
            Err(next) => format!(
                "output of {} by the backup ({out}), the primary logged no output here (next entry: {next})",
                out.source.name()
            ),
        };
        self.checks.mismatch();
        Err(self.diverged(exit, what))
    }

    /// Waits until more than `have` entries are pending.
    fn fetch_more(&mut self, exit: u64, have: usize) -> Result<(), ReplayError> {
        let saved: VecDeque<_> = std::mem::take(&mut self.pending);
        let r = self.fill(exit);
        let mut fresh = std::mem::replace(&mut self.pending, saved);
        self.pending.append(&mut fresh);
        r?;
        debug_assert!(self.pending.len() > have);
        Ok(())
    }

    fn writes(&mut self, exit: u64, apply: &mut dyn FnMut(u64, &[u8])) -> Result<(), ReplayError> {
        loop {
            self.fill(exit)?;
            let Some((seq, front)) = self.pending.front() else {
                continue;
            };
            let seq = *seq;
            if front.exit() > exit {
                return Ok(());
            }
            match front {
                Entry::Write {
                    exit: e, gpa, data, ..
                } if *e == exit => {
                    apply(*gpa, data);
                    self.pending.pop_front();
                    self.consume(seq);
                }
                Entry::Output { exit: e, digest } if *e == exit => {
                    let what = format!(
                        "output of {}: the primary produced {digest} here, the backup none",
                        digest.source.name()
                    );
                    self.checks.mismatch();
                    return Err(self.diverged(exit, what));
                }
                other => {
                    let what = format!(
                        "unexpected exit: the backup finished exit {exit}, but the log still has {other:?}"
                    );
                    return Err(self.diverged(exit, what));
                }
            }
        }
    }
}

/// The [`ReplaySource`] of a backup (shares the [`LogReader`] with the run loop).
#[derive(Debug, Clone)]
pub struct ChannelReplay(pub Arc<Mutex<LogReader>>);

impl ReplaySource for ChannelReplay {
    fn external_read(&mut self, exit: u64, addr: u64) -> Result<u64, ReplayError> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .read(exit, addr)
    }

    fn guest_writes(
        &mut self,
        exit: u64,
        apply: &mut dyn FnMut(u64, &[u8]),
    ) -> Result<(), ReplayError> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .writes(exit, apply)
    }

    fn output(&mut self, exit: u64, out: &OutputDigest) -> Result<(), ReplayError> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .output(exit, out)
    }

    fn verifies_outputs(&self) -> bool {
        true
    }
}

/// What a backup run did.
#[derive(Debug, Clone)]
pub struct BackupReport {
    /// Power-off code.
    pub code: u64,
    /// Exits replayed.
    pub exits: u64,
    /// Entries consumed.
    pub entries: u64,
    /// Checkpoints compared.
    pub checkpoints: u64,
    /// Final memory digest.
    pub mem_digest: u64,
    /// Final register digest.
    pub regs_digest: u64,
    /// Time spent waiting for entries.
    pub waited: Duration,
    /// The controls applied, in order (equal to the primary's).
    pub controls: Vec<AppliedControl>,
    /// Shared-disk mode: the disk counters (`dropped`: the guest's writes the backup did not
    /// perform, they were the primary's); `None`: the disk is not shared.
    pub disk: Option<BlkCounters>,
    /// Output digests of the primary the backup's own outputs matched.
    pub outputs_verified: u64,
    /// Bytes of output they covered.
    pub output_bytes_verified: u64,
}

/// The [`ReplayError`] among the sources of `e`, if any (the replay source's error as it came
/// up through the device, the vCPU and the VM).
fn replay_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a ReplayError> {
    std::iter::successors(Some(e), |e| e.source()).find_map(|e| e.downcast_ref::<ReplayError>())
}

fn compare(exit: u64, what: &str, ours: u64, theirs: u64) -> Result<(), PairError> {
    if ours == theirs {
        Ok(())
    } else {
        Err(PairError::Diverged {
            exit,
            what: format!("{what} digest {ours:#018x}, the primary's is {theirs:#018x}"),
        })
    }
}

/// Replays the log read by `reader` on `vm` (built from the same initial state as the
/// primary's) until the End entry.
///
/// # Errors
/// [`PairError::Diverged`] at the first difference; [`PairError::LogEnded`] when the log
/// stops before the end; [`PairError::CannotTakeOver`] when a disk request on the backup's own
/// copy gave another result than the primary's (it told the primary, GOODBYE).
pub fn run_backup(vm: &mut Vm, reader: LogReader) -> Result<BackupReport, PairError> {
    let reader = Arc::new(Mutex::new(reader));
    match backup_loop(vm, &reader, None)? {
        BackupEnd::Finished(report) => Ok(report),
        BackupEnd::Live { exit, .. } => Err(PairError::LogEnded {
            exit,
            why: "the replay went live without a go-live controller".into(),
        }),
    }
}

/// What decides, when the log runs out, whether a backup goes live ([`super::golive`]).
pub(crate) trait GoLiveHook: Send {
    /// The log ran out at exit `exit`: waits for the failure detector and the arbiter; returns
    /// whether this side won and is now live (outputs enabled, service address taken).
    fn decide(&mut self, exit: u64) -> bool;
    /// Whether the decision was made and won.
    fn is_live(&self) -> bool;
    /// The error that ended the decision, if it was lost or failed.
    fn take_failure(&mut self) -> Option<PairError>;
}

/// A shared [`GoLiveHook`].
pub(crate) type SharedGoLive = Arc<Mutex<dyn GoLiveHook>>;

/// The [`ReplaySource`] of a fault-tolerant backup: the log, and on its exhaustion the go-live
/// decision ([`ReplaySource::go_live`]).
struct FtReplay {
    log: ChannelReplay,
    golive: SharedGoLive,
}

impl ReplaySource for FtReplay {
    fn external_read(&mut self, exit: u64, addr: u64) -> Result<u64, ReplayError> {
        self.log.external_read(exit, addr)
    }

    fn between_exits(&mut self, exit: u64) -> Result<(), ReplayError> {
        self.log
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .between_exits(exit)
    }

    fn guest_writes(
        &mut self,
        exit: u64,
        apply: &mut dyn FnMut(u64, &[u8]),
    ) -> Result<(), ReplayError> {
        self.log.guest_writes(exit, apply)
    }

    fn output(&mut self, exit: u64, out: &OutputDigest) -> Result<(), ReplayError> {
        self.log.output(exit, out)
    }

    fn verifies_outputs(&self) -> bool {
        true
    }

    fn go_live(&mut self, exit: u64) -> Option<Box<dyn crate::record::Recorder>> {
        let won = self
            .golive
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .decide(exit);
        won.then(|| Box::new(()) as Box<dyn crate::record::Recorder>)
    }
}

/// How a backup's replay ended.
pub(crate) enum BackupEnd {
    /// The End entry was replayed.
    Finished(BackupReport),
    /// The log ran out and the backup went live (the VM's inputs are live).
    Live {
        /// The exit index when the replay loop noticed.
        exit: u64,
        /// How the VM's run that went live ended, if it ran on live.
        outcome: Option<RunOutcome>,
    },
}

/// The replay of a backup; with `golive`, the log running out is a go-live decision.
pub(crate) fn backup_loop(
    vm: &mut Vm,
    reader: &Arc<Mutex<LogReader>>,
    golive: Option<&SharedGoLive>,
) -> Result<BackupEnd, PairError> {
    let lock = || reader.lock().unwrap_or_else(|e| e.into_inner());
    lock().observer().watch_exits(vm.stats());
    lock().stop = Some(vm.control());
    let hook = || golive.map(|g| g.lock().unwrap_or_else(|e| e.into_inner()));
    let ended = |exit: u64, e: ReplayError| match e {
        ReplayError::Diverged { exit, what } => PairError::Diverged { exit, what },
        ReplayError::Exhausted { .. } => PairError::LogEnded {
            exit,
            why: "the primary's log stopped".into(),
        },
    };
    // The log ran out between exits: go live here if the decision is won.
    let run_out = |vm: &mut Vm, exit: u64, e: ReplayError| -> Result<BackupEnd, PairError> {
        if matches!(e, ReplayError::Exhausted { .. }) {
            if let Some(mut h) = hook() {
                if h.decide(exit) {
                    vm.set_inputs(Inputs::default());
                    return Ok(BackupEnd::Live {
                        exit,
                        outcome: None,
                    });
                }
                if let Some(f) = h.take_failure() {
                    return Err(f);
                }
            } else if let Some(s) = lock().planned_stop(exit) {
                return Err(s);
            }
        }
        Err(ended(exit, e))
    };
    // (The reader's lock must be released before `run_out`: the decision takes it.)
    let first = lock().next_entry(0);
    let header = match first {
        Ok(h) => h,
        Err(e) => return run_out(vm, 0, e),
    };
    let Entry::Header {
        digest_interval,
        mem_digest_every,
        ..
    } = header
    else {
        return Err(PairError::Diverged {
            exit: 0,
            what: format!("the log starts with {header:?}, not a header"),
        });
    };
    tracing::info!(digest_interval, mem_digest_every, "replaying");
    let shared_disk = vm.shared_disk().cloned();
    if let Some(d) = &shared_disk {
        // The primary owns the disk while this side replays.
        d.set_mode(DiskMode::Replay);
    }
    let log = ChannelReplay(Arc::clone(reader));
    vm.set_inputs(Inputs::Replay(match golive {
        Some(g) => Box::new(FtReplay {
            log,
            golive: Arc::clone(g),
        }),
        None => Box::new(log),
    }));
    let interval = digest_interval.max(1);
    let mut checkpoints = 0u64;
    let mut result = loop {
        let target = (vm.stats().total() / interval + 1) * interval;
        let outcome = vm.run_until(Some(target));
        let exit = vm.stats().total();
        if hook().is_some_and(|h| h.is_live()) {
            // The log ran out during that run and the VM went live.
            return match outcome {
                Ok(o) => Ok(BackupEnd::Live {
                    exit,
                    outcome: Some(o),
                }),
                Err(e) => Err(e.into()),
            };
        }
        let outcome = match outcome {
            Ok(o) => o,
            Err(e) => {
                if let Some(f) = vm.disk().and_then(BlkHandle::copy_failure) {
                    break Err(PairError::CannotTakeOver(f));
                }
                if let Some(f) = hook().and_then(|mut h| h.take_failure()) {
                    break Err(f);
                }
                let mut r = lock();
                if let Some((exit, what)) = r.divergence.take() {
                    break Err(PairError::Diverged { exit, what });
                }
                drop(r);
                if matches!(replay_error(&e), Some(ReplayError::Exhausted { .. })) {
                    if let Some(s) = lock().planned_stop(exit) {
                        break Err(s);
                    }
                    break Err(PairError::LogEnded {
                        exit,
                        why: "the primary's log stopped".into(),
                    });
                }
                let text = format!("{e}: {}", super::primary::error_chain(&e));
                break Err(PairError::Diverged {
                    exit,
                    what: format!("the backup failed where the primary did not: {text}"),
                });
            }
        };
        if outcome == RunOutcome::Paused {
            break Err(lock().planned_stop(exit).unwrap_or(PairError::Paused(exit)));
        }
        let next = lock().next_entry(exit);
        let entry = match next {
            Ok(e) => e,
            Err(e) => {
                vm.set_inputs(Inputs::default());
                return run_out(vm, exit, e);
            }
        };
        let entry = match entry {
            Entry::Control { .. } if outcome == RunOutcome::ExitLimit => {
                match apply_controls(reader, exit, entry) {
                    Ok(next) => next,
                    Err(PairError::LogEnded { .. }) => {
                        vm.set_inputs(Inputs::default());
                        return run_out(vm, exit, ReplayError::Exhausted { exit });
                    }
                    Err(e) => break Err(e),
                }
            }
            entry => entry,
        };
        match (outcome, entry) {
            (RunOutcome::ExitLimit, Entry::Digest { exit: e, regs, mem }) if e == exit => {
                checkpoints += 1;
                if let Err(d) = compare(exit, "register", register_digest(vm), regs) {
                    break Err(d);
                }
                if let Some(m) = mem {
                    if let Err(d) = compare(exit, "memory", vm.memory_digest(), m) {
                        break Err(d);
                    }
                }
            }
            (
                RunOutcome::PoweredOff(code),
                Entry::End {
                    exit: e,
                    code: c,
                    regs,
                    mem,
                },
            ) if e == exit => {
                if code != c {
                    break Err(PairError::Diverged {
                        exit,
                        what: format!("powered off with {code}, the primary with {c}"),
                    });
                }
                let r = compare(exit, "register", register_digest(vm), regs)
                    .and_then(|()| compare(exit, "memory", vm.memory_digest(), mem));
                break r.map(|()| code);
            }
            (outcome, entry) => {
                break Err(PairError::Diverged {
                    exit,
                    what: format!("the backup stopped with {outcome:?}, the log has {entry:?}"),
                })
            }
        }
    };
    vm.set_inputs(Inputs::default());
    match &mut result {
        Err(PairError::CannotTakeOver(f)) => {
            lock().goodbye(GoodbyeReason::CannotTakeOver, &f.to_string());
        }
        Err(PairError::Stopped(s)) if s.cause == StopCause::Requested => {
            // From here on this backup never goes live: the primary may go on alone.
            s.told_peer = lock().goodbye(GoodbyeReason::PlannedStop, "the backup stops as planned");
        }
        _ => {}
    }
    let code = result?;
    let mut r = lock();
    r.linger(Duration::from_secs(30));
    Ok(BackupEnd::Finished(BackupReport {
        code,
        exits: vm.stats().total(),
        entries: r.consumed,
        checkpoints,
        mem_digest: vm.memory_digest(),
        regs_digest: register_digest(vm),
        waited: r.waited,
        controls: r.controls.applied(),
        disk: shared_disk.map(|d| d.counters()),
        outputs_verified: r.checks.verified_count(),
        output_bytes_verified: r.checks.verified_bytes(),
    }))
}

/// Applies the Control entries logged at checkpoint `exit` (`first` is the first of them);
/// returns the entry that follows them (the checkpoint's Digest).
fn apply_controls(
    reader: &Arc<Mutex<LogReader>>,
    exit: u64,
    first: Entry,
) -> Result<Entry, PairError> {
    let mut entry = first;
    loop {
        let Entry::Control {
            exit: e,
            key,
            value,
        } = entry
        else {
            return Ok(entry);
        };
        if e != exit {
            return Err(PairError::Diverged {
                exit,
                what: format!("the log has a control for exit {e} at checkpoint {exit}"),
            });
        }
        let mut r = reader.lock().unwrap_or_else(|e| e.into_inner());
        r.controls.apply(AppliedControl { exit, key, value });
        entry = r.next_entry(exit).map_err(|e| match e {
            ReplayError::Diverged { exit, what } => PairError::Diverged { exit, what },
            ReplayError::Exhausted { .. } => PairError::LogEnded {
                exit,
                why: "the primary's log stopped".into(),
            },
        })?;
    }
}
