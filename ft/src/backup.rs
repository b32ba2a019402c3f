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
//! One owner at each end of the ring: the run loop ([`run_backup`]) owns the [`LogReader`]
//! and lends it to the VM's replay source ([`ChannelReplay`]) while the vCPU runs, taking it
//! back between runs (no lock on the replay's path). Entries are read in place from the log
//! buffer: a `Write`'s data go from the ring straight to guest memory, and a record is
//! released to the receiver once consumed. An exit's read or output digest may be taken
//! before the writes the primary logged ahead of it (the writes are applied at the end of the
//! exit): such a record is remembered as taken, and released with the records before it.
//!
//! When the log runs out (the primary is gone), the replay source only says so
//! ([`ReplayError::Exhausted`]): the vCPU returns to the run loop with the exit pending
//! ([`RunOutcome::ReplayExhausted`]), the run loop takes the reader back and hands it to the
//! go-live decision (`GoLiveHook`, [`super::golive`]) — never from inside an exit handler.
//! Won, it installs live inputs and the VM's next run completes that exit live; otherwise the
//! decision's error ends the run. The backup's role meanwhile (REPLAYING → DRAINING when the
//! log stops, then DECIDING → LIVE, SUPERSEDED …) is the state machine of [`super::role`].
//!
//! Shared-disk mode (the primary and the backup name the same image): while it replays, the
//! backup's virtio-blk device does not touch the disk (read data come from the log, writes are
//! dropped and counted: [`DiskMode::Replay`]); the disk becomes the backup's when it goes live
//! ([`super::golive`]).

use std::borrow::Cow;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ftvm_channel::{GoodbyeReason, LogReceiver, TransportError};
use ftvm_ringbuf::IdleKind;

use super::detector::TrafficNote;
use super::log::{decode_write, device_name, AppliedControl, ControlQueue, Entry, KIND_WRITE};
use super::observe::{LogSnapshot, Observer, SideRole};
use super::stop::{is_planned, StopCause, Stopped};
use crate::error::{LinkDown, PairError, SetupError};
use crate::role::{BackupEvent, BackupRoleCell};
use ftvm_vmm_core::devices::virtio::blk::{BlkCounters, BlkHandle, DiskMode};
use ftvm_vmm_core::digest::register_digest;
use ftvm_vmm_core::record::{Inputs, OutputDigest, ReplayError, ReplaySource};
use ftvm_vmm_core::vm::{RunOutcome, Vm};

/// With [`IdleKind::Park`], empty polls of the log before the replaying vCPU sleeps until the
/// receiver delivers (a poll is ~50 ns: a few tens of microseconds of spinning).
const PARK_AFTER_POLLS: u32 = 500;

/// A hook that may alter an entry as it is received (tests: a corrupted entry).
pub type Tamper = Box<dyn FnMut(u64, &mut Entry) + Send>;

/// Reads entries from the receiver's log buffer, blocking with an idle strategy.
pub struct LogReader {
    rx: LogReceiver,
    /// Records after the consumer's head consumed out of order (an exit's read or output,
    /// taken before the writes logged ahead of it): released with the records before them.
    /// At most a few, within one exit.
    taken: Vec<At>,
    /// The first record not yet consumed, decoded by [`LogReader::writes`] when it ended an
    /// exit (an entry of the next exit, not a write), with the head it was found from: the
    /// next exit's read or output takes it from here instead of decoding it again. Dropped at
    /// every consume, and never kept with a [`Tamper`] hook.
    peeked: Option<(u64, At, Entry)>,
    /// The committed position last seen (new records are traffic from the primary).
    seen: u64,
    /// With a [`Tamper`] hook (tests): the entries it altered and the replay has not consumed
    /// yet, and the last sequence number it saw (each record is altered once, as received).
    tampered: Vec<(u64, Entry)>,
    tamper_upto: u64,
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
    stop: Option<ftvm_vmm_core::vm::VmControl>,
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
    /// The backup's role: DRAINING once the log stopped ([`super::role`]).
    role: BackupRoleCell,
    /// The failure detector presumes the primary failed.
    peer_failed: Arc<AtomicBool>,
    /// Reports log traffic to the failure detector.
    traffic: TrafficNote,
    /// The receiver was stopped (no more records are received or acknowledged).
    severed: bool,
    /// When the log was first seen to stop (link error, or the primary presumed failed).
    lost_at: Option<Instant>,
}

impl Watch {
    /// The log was seen to stop (now, if not before): REPLAYING → DRAINING.
    fn log_stopped(&mut self) {
        if self.lost_at.is_none() {
            self.lost_at = Some(Instant::now());
            if let Err(e) = self.role.step(BackupEvent::LogStopped) {
                tracing::warn!(error = %e, "backup role: transition refused");
            }
        }
    }
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
            .field("taken", &self.taken.len())
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
            taken: Vec::new(),
            peeked: None,
            seen: 0,
            tampered: Vec::new(),
            tamper_upto: 0,
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
    pub(crate) fn watch(
        &mut self,
        peer_failed: Arc<AtomicBool>,
        traffic: TrafficNote,
        role: BackupRoleCell,
    ) {
        self.watch = Some(Watch {
            role,
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
            w.log_stopped();
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

    /// Walks the records not yet consumed, from the consumer's head, decoding each in place
    /// ([`View`]), until `f` breaks: `Ok(Some(_))` with what it broke with, `Ok(None)` when
    /// the walk reached the records received so far (`end`: the position after the last
    /// record walked).
    fn scan<R>(
        &mut self,
        exit: u64,
        end: &mut u64,
        mut f: impl FnMut(At, View<'_>) -> ControlFlow<R>,
    ) -> Result<Option<R>, ReplayError> {
        let mut pos = self.rx.consumer().position();
        let mut bad = None;
        let found = 'walk: loop {
            let batch = self.rx.consumer().read_from(pos);
            if batch.is_empty() {
                break None;
            }
            let batch_end = batch.end_position();
            for r in batch.records() {
                let r = match r {
                    Ok(r) => r,
                    Err(e) => {
                        bad = Some(format!("the log buffer is corrupt: {e}"));
                        break 'walk None;
                    }
                };
                pos = r.next_position();
                let at = At {
                    pos: r.position(),
                    next: r.next_position(),
                    seq: r.seq(),
                };
                if self.taken.iter().any(|t| t.pos == at.pos) {
                    continue;
                }
                let tamper = self.tamper.as_mut().map(|t| Tampering {
                    hook: t,
                    done: &mut self.tampered,
                    upto: &mut self.tamper_upto,
                });
                match View::decode(r.kind(), r.payload(), at.seq, tamper) {
                    Ok(v) => {
                        if let ControlFlow::Break(x) = f(at, v) {
                            break 'walk Some(x);
                        }
                    }
                    Err(e) => {
                        bad = Some(format!("log record {} is not an entry: {e}", at.seq));
                        break 'walk None;
                    }
                }
            }
            // Past the batch's end (padding at the wrap point holds no record).
            pos = pos.max(batch_end);
        };
        *end = pos;
        self.note_traffic(pos);
        match bad {
            Some(what) => Err(self.diverged(exit, what)),
            None => Ok(found),
        }
    }

    /// Records end at `committed` now: if that is new, traffic from the primary (for the
    /// failure detector, once per look at the log, as records are read).
    fn note_traffic(&mut self, committed: u64) {
        if committed > self.seen {
            self.seen = committed;
            if let Some(w) = &self.watch {
                w.traffic.note();
            }
        }
    }

    /// Whether a record is waiting that was not consumed.
    fn has_entries(&mut self) -> bool {
        let c = self.rx.consumer();
        c.committed_position() > c.position()
    }

    /// Between two exits ([`ReplaySource::between_exits`]): `Err(Exhausted)` when the log has
    /// nothing more for this run — the primary is presumed failed, the receiver is stopped
    /// (here, if it was not yet), and no entry is left. Entries still pending belong to later
    /// exits, which the vCPU reaches by replaying on (it then decides at one of them).
    pub(crate) fn between_exits(&mut self, exit: u64) -> Result<(), ReplayError> {
        let Some(w) = &self.watch else {
            return Ok(());
        };
        let severed = w.severed;
        if !w.peer_failed.load(Ordering::Acquire) || self.has_entries() {
            return Ok(());
        }
        if !severed {
            tracing::warn!(
                exit,
                "the primary is presumed failed while the vCPU runs between exits: stopping \
                 the log receiver"
            );
            self.sever();
        }
        // What the receiver held when it stopped.
        if self.has_entries() {
            Ok(())
        } else {
            Err(ReplayError::Exhausted { exit })
        }
    }

    /// Waits until records end beyond log position `pos` (the replay has looked at everything
    /// before it and needs more).
    fn fill_beyond(&mut self, exit: u64, pos: u64) -> Result<(), ReplayError> {
        if self.rx.consumer().committed_position() > pos {
            return Ok(());
        }
        let mut idle = self.idle.build();
        let mut spins = 0u32;
        let started = Instant::now();
        loop {
            let running = self.rx.is_running();
            let committed = self.rx.consumer().committed_position();
            self.note_traffic(committed);
            if committed > pos {
                break;
            }
            if !running {
                // Every record received before the link ended was handed out.
                let e = self
                    .rx
                    .error()
                    .unwrap_or(TransportError::Closed { mid_frame: false });
                if let Some(w) = self.watch.as_mut() {
                    w.log_stopped();
                }
                tracing::warn!(error = %e, exit, "log ended");
                return Err(ReplayError::Exhausted { exit });
            }
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
                // A planned stop of this backup: the replay ends here (the run's driver sees
                // the request and does not go live).
                return Err(ReplayError::Exhausted { exit });
            } else if self.stop.as_ref().is_some_and(|c| c.kick_pending()) {
                // Asked to pause while no entry comes: the run ends here (unless the entry
                // arrives first, a kick lands between exits).
                return Err(ReplayError::Interrupted { exit });
            } else if self.idle == IdleKind::Park {
                // Spin a little (the next entry is often microseconds away), then sleep until
                // the receiver delivers: a spinning backup vCPU takes the CPU from the pollers
                // and the primary when they share cores.
                spins += 1;
                if spins < PARK_AFTER_POLLS {
                    std::hint::spin_loop();
                } else {
                    self.rx.wait_beyond(pos, Duration::from_millis(1));
                }
            } else {
                idle.idle(0);
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

    /// Consumes the record `at`: reports it executed, and releases it to the receiver with the
    /// records after it consumed before (or keeps it as taken, while records before it are
    /// still to be replayed: an exit's read or output, taken before the exit's writes).
    fn consume(&mut self, at: At) {
        self.consumed += 1;
        self.peeked = None;
        if !self.tampered.is_empty() {
            self.tampered.retain(|(seq, _)| *seq != at.seq);
        }
        self.rx.report_executed(at.seq);
        let head = self.rx.consumer().position();
        debug_assert!(at.pos >= head, "a record is consumed once");
        // A record after the head is consumed out of order (kept as taken), unless only the
        // padding at the wrap point lies between: left at the padding, the head would make
        // this record look consumed out of order (taken, never released), and the replay would
        // wait for ever on a full buffer.
        if at.pos != head && !self.first_record_is(head, at.pos) {
            self.taken.push(at);
            return;
        }
        if self.taken.is_empty() {
            // In order, nothing taken after it: the common case, one store.
            self.rx.consumer().release_to(at.next);
        } else {
            self.release_from(at.next);
        }
    }

    /// Whether the first record from log position `from` on is at `pos` (only padding, if
    /// anything, between the two).
    fn first_record_is(&mut self, mut from: u64, pos: u64) -> bool {
        loop {
            let batch = self.rx.consumer().read_from(from);
            if batch.is_empty() {
                return false;
            }
            let end = batch.end_position();
            if let Some(first) = batch.records().next() {
                return first.is_ok_and(|r| r.position() == pos);
            }
            // A batch of padding only (it runs to the end of the data area): the next
            // record is at the start.
            from = end;
        }
    }

    /// Releases the log buffer up to the first record from `pos` on that was not consumed
    /// (past the taken records and the padding at the wrap point in between).
    fn release_from(&mut self, mut pos: u64) {
        'walk: loop {
            let batch = self.rx.consumer().read_from(pos);
            if batch.is_empty() {
                break;
            }
            let end = batch.end_position();
            for r in batch.records() {
                let Ok(r) = r else {
                    break 'walk;
                };
                match self.taken.iter().position(|t| t.pos == r.position()) {
                    Some(i) => {
                        self.taken.swap_remove(i);
                        pos = r.next_position();
                    }
                    None => {
                        pos = r.position();
                        break 'walk;
                    }
                }
            }
            // Only taken records (or padding) to the end of this batch.
            pos = end;
        }
        self.rx.consumer().release_to(pos);
    }

    /// Takes the next entry (blocking).
    ///
    /// # Errors
    /// [`ReplayError::Exhausted`] when the log ended.
    pub fn next_entry(&mut self, exit: u64) -> Result<Entry, ReplayError> {
        loop {
            let mut end = 0;
            let found = self.scan(exit, &mut end, |at, v| {
                ControlFlow::Break((at, v.to_entry()))
            })?;
            match found {
                Some((at, e)) => {
                    self.consume(at);
                    return Ok(e);
                }
                None => self.fill_beyond(exit, end)?,
            }
        }
    }

    /// The first entry of exit `exit` not yet consumed that is not a `Write` (the writes of an
    /// exit are applied at its end, and the live run logs them as the devices make them, so
    /// they may come before the exit's read or output digest); waits while only writes of this
    /// exit are pending. [`NextEvent::Other`] with the next entry when the log goes on with
    /// another exit (or a header) instead.
    fn next_event(&mut self, exit: u64) -> Result<NextEvent, ReplayError> {
        let classify = |at: At, e: Entry| {
            if e.exit() != exit || matches!(e, Entry::Header { .. }) {
                NextEvent::Other(e)
            } else {
                NextEvent::Found(at, e)
            }
        };
        // The record that ended the last exit's writes: the first one from the head.
        if let Some((head, at, e)) = self.peeked.take() {
            if head == self.rx.consumer().position() {
                return Ok(classify(at, e));
            }
        }
        // Look first, wait only when nothing is there (each look re-reads the receiver's
        // tail: one per exit on the common path).
        loop {
            let mut end = 0;
            let found = self.scan(exit, &mut end, |at, v| match v {
                View::Entry(e) => ControlFlow::Break(classify(at, e)),
                View::Write { exit: x, .. } if x != exit => {
                    ControlFlow::Break(NextEvent::Other(v.to_entry()))
                }
                View::Write { .. } => ControlFlow::Continue(()),
            })?;
            match found {
                Some(r) => return Ok(r),
                // Only writes of this exit so far: wait for more.
                None => self.fill_beyond(exit, end)?,
            }
        }
    }

    fn read(&mut self, exit: u64, addr: u64) -> Result<u64, ReplayError> {
        let next = match self.next_event(exit)? {
            NextEvent::Found(at, Entry::Read { addr: a, value, .. }) => {
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
                self.consume(at);
                return Ok(value);
            }
            NextEvent::Found(_, e) | NextEvent::Other(e) => e,
        };
        Err(self.diverged(
            exit,
            format!(
                "unexpected exit: the backup read {addr:#x} ({}), the primary logged no read here (next entry: {next:?})",
                device_name(addr)
            ),
        ))
    }

    /// The backup produced the outputs digested in `out` at exit `exit`: the primary's log
    /// must have the same digest here (see [`OutputChecks`]).
    fn output(&mut self, exit: u64, out: &OutputDigest) -> Result<(), ReplayError> {
        let what = match self.next_event(exit)? {
            NextEvent::Found(at, Entry::Output { digest, .. }) if digest == *out => {
                self.consume(at);
                self.checks.verified(out);
                return Ok(());
            }
            NextEvent::Found(at, Entry::Output { digest: theirs, .. }) => {
                self.consume(at);
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
            NextEvent::Found(_, e) | NextEvent::Other(e) => format!(
                "output of {} by the backup ({out}), the primary logged no output here (next entry: {e:?})",
                out.source.name()
            ),
        };
        self.checks.mismatch();
        Err(self.diverged(exit, what))
    }

    fn writes(&mut self, exit: u64, apply: &mut dyn FnMut(u64, &[u8])) -> Result<(), ReplayError> {
        loop {
            let mut end = 0;
            // The data go from the log buffer to guest memory: no copy in between.
            let keep = self.tamper.is_none();
            let step = self.scan(exit, &mut end, |at, v| {
                ControlFlow::Break(match v {
                    View::Entry(e) if keep && e.exit() > exit => WriteStep::Next(at, e),
                    _ if v.exit() > exit => WriteStep::Done,
                    View::Write {
                        exit: e, gpa, data, ..
                    } if e == exit => {
                        apply(gpa, &data);
                        WriteStep::Applied(at)
                    }
                    View::Entry(Entry::Output { exit: e, digest }) if e == exit => {
                        WriteStep::Missing(format!(
                            "output of {}: the primary produced {digest} here, the backup none",
                            digest.source.name()
                        ))
                    }
                    other => WriteStep::Unexpected(format!(
                        "unexpected exit: the backup finished exit {exit}, but the log still has {:?}",
                        other.to_entry()
                    )),
                })
            })?;
            match step {
                // Nothing after the exit's entries yet: wait for more.
                None => self.fill_beyond(exit, end)?,
                Some(WriteStep::Done) => return Ok(()),
                Some(WriteStep::Next(at, e)) => {
                    // Nothing was consumed since the scan began at the head: it is the first
                    // record from there.
                    self.peeked = Some((self.rx.consumer().position(), at, e));
                    return Ok(());
                }
                Some(WriteStep::Applied(at)) => self.consume(at),
                Some(WriteStep::Missing(what)) => {
                    self.checks.mismatch();
                    return Err(self.diverged(exit, what));
                }
                Some(WriteStep::Unexpected(what)) => return Err(self.diverged(exit, what)),
            }
        }
    }
}

/// Where a record of the log buffer is: its position, the next record's, its sequence number.
#[derive(Debug, Clone, Copy)]
struct At {
    pos: u64,
    next: u64,
    seq: u64,
}

/// A log record as the replay reads it, decoded in place: a `Write`'s data are borrowed from
/// the log buffer (every other entry is a few words).
#[derive(Debug)]
enum View<'a> {
    /// A guest write: applied to guest memory straight from the log buffer.
    Write {
        exit: u64,
        gpa: u64,
        /// Owned only when a test's [`Tamper`] hook altered the entry.
        data: Cow<'a, [u8]>,
    },
    /// Any other entry.
    Entry(Entry),
}

impl<'a> View<'a> {
    fn decode(
        kind: u16,
        payload: &'a [u8],
        seq: u64,
        tamper: Option<Tampering<'_>>,
    ) -> Result<Self, super::log::LogError> {
        let Some(t) = tamper else {
            if kind == KIND_WRITE {
                let (exit, gpa, data) = decode_write(payload)?;
                return Ok(View::Write {
                    exit,
                    gpa,
                    data: Cow::Borrowed(data),
                });
            }
            return Ok(View::Entry(Entry::decode(kind, payload)?));
        };
        let e = t.entry(seq, || Entry::decode(kind, payload))?;
        Ok(match e {
            Entry::Write { exit, gpa, data } => View::Write {
                exit,
                gpa,
                data: Cow::Owned(data),
            },
            e => View::Entry(e),
        })
    }

    fn exit(&self) -> u64 {
        match self {
            View::Write { exit, .. } => *exit,
            View::Entry(e) => e.exit(),
        }
    }

    /// The entry, owned (a `Write`'s data copied: for the run loop's rare entries and for
    /// error messages, never on the replay's path).
    fn to_entry(&self) -> Entry {
        match self {
            View::Write { exit, gpa, data } => Entry::Write {
                exit: *exit,
                gpa: *gpa,
                data: data.to_vec(),
            },
            View::Entry(e) => e.clone(),
        }
    }
}

/// A test's [`Tamper`] hook and what it altered so far: the production path decodes in
/// place; with a hook, each record is decoded once into an owned entry, altered, and kept
/// until consumed (the hook sees every record once, as received, whatever the replay looks
/// at twice).
struct Tampering<'r> {
    hook: &'r mut Tamper,
    done: &'r mut Vec<(u64, Entry)>,
    upto: &'r mut u64,
}

impl Tampering<'_> {
    /// The altered entry of record `seq` (decoded with `decode` the first time).
    fn entry(
        self,
        seq: u64,
        decode: impl FnOnce() -> Result<Entry, super::log::LogError>,
    ) -> Result<Entry, super::log::LogError> {
        if seq <= *self.upto {
            if let Some((_, e)) = self.done.iter().find(|(s, _)| *s == seq) {
                return Ok(e.clone());
            }
        }
        let mut e = decode()?;
        (self.hook)(seq, &mut e);
        *self.upto = (*self.upto).max(seq);
        self.done.push((seq, e.clone()));
        Ok(e)
    }
}

/// What [`LogReader::next_event`] found.
enum NextEvent {
    /// The first entry of the exit that is not a `Write`.
    Found(At, Entry),
    /// The log goes on with this entry of another exit (or a header) instead.
    Other(Entry),
}

/// What [`LogReader::writes`] found at the head of the log.
enum WriteStep {
    /// An entry of a later exit: this exit's writes are all applied.
    Done,
    /// The same, the entry kept for the next exit ([`LogReader::peeked`]).
    Next(At, Entry),
    /// A write of this exit, applied.
    Applied(At),
    /// An output of this exit the backup did not produce.
    Missing(String),
    /// Anything else.
    Unexpected(String),
}

/// The [`ReplaySource`] of a backup: the one owner of the [`LogReader`] while the vCPU runs
/// (the run loop lends it the reader and takes it back between runs: no lock on the replay's
/// path). When the log runs out it only says so ([`ReplayError::Exhausted`]): the run returns
/// to the run loop ([`RunOutcome::ReplayExhausted`]), which decides (`GoLiveHook`).
#[derive(Debug)]
pub struct ChannelReplay {
    reader: LogReader,
}

impl ChannelReplay {
    /// A replay source reading `reader` (the log running out ends the replay).
    pub fn new(reader: LogReader) -> Self {
        ChannelReplay { reader }
    }

    /// The reader, back.
    pub fn into_reader(self) -> LogReader {
        self.reader
    }
}

impl ReplaySource for ChannelReplay {
    fn external_read(&mut self, exit: u64, addr: u64) -> Result<u64, ReplayError> {
        self.reader.read(exit, addr)
    }

    fn between_exits(&mut self, exit: u64) -> Result<(), ReplayError> {
        self.reader.between_exits(exit)
    }

    fn guest_writes(
        &mut self,
        exit: u64,
        apply: &mut dyn FnMut(u64, &[u8]),
    ) -> Result<(), ReplayError> {
        self.reader.writes(exit, apply)
    }

    fn output(&mut self, exit: u64, out: &OutputDigest) -> Result<(), ReplayError> {
        self.reader.output(exit, out)
    }

    fn verifies_outputs(&self) -> bool {
        true
    }

    fn as_any_mut(&mut self) -> Option<&mut dyn std::any::Any> {
        Some(self)
    }

    fn into_any(self: Box<Self>) -> Option<Box<dyn std::any::Any>> {
        Some(self)
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
    match backup_loop(vm, reader, None)? {
        BackupEnd::Finished(report) => Ok(report),
        BackupEnd::Live { exit } => Err(PairError::LogEnded {
            exit,
            why: LinkDown::LogStopped,
        }),
    }
}

/// What decides, when the log runs out, whether a backup goes live ([`super::golive`]): the
/// backup's run loop, with the VM paused where the replay ran out.
pub(crate) trait GoLiveHook {
    /// The log ran out at exit `exit` (`reader` is the log, stopped or to be stopped; the VM
    /// is paused there): waits for the failure detector and the arbiter. `Ok` if this side
    /// won and is now live (outputs enabled, service address taken: the run loop resumes the
    /// VM with live inputs); the error says why not (lost, a planned stop, the arbiter
    /// failed).
    ///
    /// # Errors
    /// As above.
    fn decide(&mut self, exit: u64, reader: &mut LogReader) -> Result<(), PairError>;
}

/// How a backup's replay ended.
pub(crate) enum BackupEnd {
    /// The End entry was replayed.
    Finished(BackupReport),
    /// The log ran out at exit `exit` and the backup went live: the VM is paused there with
    /// live inputs (its next run completes the exit left pending, live).
    Live {
        /// The exit index where the replay ran out.
        exit: u64,
    },
}

/// The reader of a backup run: in the run loop's hands (`parked`), or lent to the VM's
/// [`ChannelReplay`] while the vCPU runs (gone once the VM went live).
struct Held {
    parked: Option<LogReader>,
}

impl Held {
    /// Lends the reader to `vm`'s replay source.
    fn lend(&mut self, vm: &mut Vm) {
        if let Some(reader) = self.parked.take() {
            vm.set_inputs(Inputs::Replay(Box::new(ChannelReplay { reader })));
        }
    }

    /// Takes the reader back from `vm`, whose inputs become live without a recorder.
    fn take_back(&mut self, vm: &mut Vm) {
        if let Some(c) = vm.take_replay::<ChannelReplay>() {
            self.parked = Some(c.into_reader());
        }
        vm.set_inputs(Inputs::default());
    }

    /// The reader, wherever it is.
    fn get<'a>(&'a mut self, vm: &'a mut Vm) -> Result<&'a mut LogReader, PairError> {
        match self.parked.as_mut() {
            Some(r) => Ok(r),
            None => vm
                .replay_mut::<ChannelReplay>()
                .map(|c| &mut c.reader)
                .ok_or(PairError::Setup(SetupError::ReplayGone)),
        }
    }
}

fn ended(exit: u64, e: ReplayError) -> PairError {
    match e {
        ReplayError::Diverged { exit, what } => PairError::Diverged { exit, what },
        ReplayError::Exhausted { .. } => PairError::LogEnded {
            exit,
            why: LinkDown::LogStopped,
        },
        ReplayError::Interrupted { exit } => PairError::Paused(exit),
    }
}

/// The log ran out at exit `exit` (`e`; the reader is back in the run loop's hands, the VM
/// paused there): with a go-live hook, this side goes live here if it wins the decision.
fn run_out(
    vm: &mut Vm,
    reader: Option<&mut LogReader>,
    golive: Option<&mut (dyn GoLiveHook + '_)>,
    exit: u64,
    e: ReplayError,
) -> Result<BackupEnd, PairError> {
    if let (ReplayError::Exhausted { .. }, Some(reader)) = (&e, reader) {
        if let Some(g) = golive {
            g.decide(exit, reader)?;
            vm.set_inputs(Inputs::default());
            return Ok(BackupEnd::Live { exit });
        }
        if let Some(s) = reader.planned_stop(exit) {
            return Err(s);
        }
    }
    Err(ended(exit, e))
}

/// The replay of a backup; with `golive`, the log running out is a go-live decision.
pub(crate) fn backup_loop(
    vm: &mut Vm,
    mut reader: LogReader,
    golive: Option<&mut (dyn GoLiveHook + '_)>,
) -> Result<BackupEnd, PairError> {
    reader.observer().watch_exits(vm.stats());
    reader.stop = Some(vm.control());
    let first = reader.next_entry(0);
    let header = match first {
        Ok(h) => h,
        Err(e) => return run_out(vm, Some(&mut reader), golive, 0, e),
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
    let mut held = Held {
        parked: Some(reader),
    };
    held.lend(vm);
    let interval = digest_interval.max(1);
    let mut checkpoints = 0u64;
    let mut result = loop {
        let target = (vm.stats().total() / interval + 1) * interval;
        let outcome = vm.run_until(Some(target));
        let exit = vm.stats().total();
        let outcome = match outcome {
            // The log ran out during that run: the VM is paused where it did (inside the exit
            // if at a read or at the end of one), and this loop decides.
            Ok(RunOutcome::ReplayExhausted { exit, at }) => {
                tracing::info!(exit, ?at, "the replay ran out");
                held.take_back(vm);
                let e = ReplayError::Exhausted { exit };
                // Not live: the end of this loop still tells the primary (a planned stop).
                match run_out(vm, held.parked.as_mut(), golive, exit, e) {
                    Ok(end) => return Ok(end),
                    Err(e) => break Err(e),
                }
            }
            Ok(o) => o,
            Err(e) => {
                if let Some(f) = vm.disk().and_then(BlkHandle::copy_failure) {
                    break Err(PairError::CannotTakeOver(f));
                }
                if let Some((exit, what)) = held.get(vm)?.divergence.take() {
                    break Err(PairError::Diverged { exit, what });
                }
                if matches!(replay_error(&e), Some(ReplayError::Interrupted { .. })) {
                    let r = held.get(vm)?;
                    break Err(r.planned_stop(exit).unwrap_or(PairError::Paused(exit)));
                }
                if matches!(replay_error(&e), Some(ReplayError::Exhausted { .. })) {
                    if let Some(s) = held.get(vm)?.planned_stop(exit) {
                        break Err(s);
                    }
                    break Err(PairError::LogEnded {
                        exit,
                        why: LinkDown::LogStopped,
                    });
                }
                let text = format!("{e}: {}", ftvm_vmm_core::error_chain(&e));
                break Err(PairError::Diverged {
                    exit,
                    what: format!("the backup failed where the primary did not: {text}"),
                });
            }
        };
        if outcome == RunOutcome::Paused {
            break Err(held
                .get(vm)?
                .planned_stop(exit)
                .unwrap_or(PairError::Paused(exit)));
        }
        let next = held.get(vm)?.next_entry(exit);
        let entry = match next {
            Ok(e) => e,
            Err(e) => {
                held.take_back(vm);
                match run_out(vm, held.parked.as_mut(), golive, exit, e) {
                    Ok(end) => return Ok(end),
                    Err(e) => break Err(e),
                }
            }
        };
        let entry = match entry {
            Entry::Control { .. } if outcome == RunOutcome::ExitLimit => {
                match apply_controls(held.get(vm)?, exit, entry) {
                    Ok(next) => next,
                    Err(PairError::LogEnded { .. }) => {
                        held.take_back(vm);
                        let e = ReplayError::Exhausted { exit };
                        match run_out(vm, held.parked.as_mut(), golive, exit, e) {
                            Ok(end) => return Ok(end),
                            Err(e) => break Err(e),
                        }
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
    held.take_back(vm);
    let Some(r) = held.parked.as_mut() else {
        return Err(PairError::Setup(SetupError::ReaderGone));
    };
    match &mut result {
        Err(PairError::CannotTakeOver(f)) => {
            r.goodbye(GoodbyeReason::CannotTakeOver, &f.to_string());
        }
        Err(PairError::Stopped(s)) if s.cause == StopCause::Requested => {
            // From here on this backup never goes live: the primary may go on alone.
            s.told_peer = r.goodbye(GoodbyeReason::PlannedStop, "the backup stops as planned");
        }
        _ => {}
    }
    let code = result?;
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
fn apply_controls(reader: &mut LogReader, exit: u64, first: Entry) -> Result<Entry, PairError> {
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
        reader.controls.apply(AppliedControl { exit, key, value });
        entry = reader.next_entry(exit).map_err(|e| ended(exit, e))?;
    }
}
