//! The runs of a side: [`run_primary`], [`run_primary_ft`] and [`run_backup_ft`], and the
//! primary's run loop they share, which ties logging, the failover side and the join point
//! together.
//!
//! ```text
//! run_primary ────┐
//! run_primary_ft ─┼─> primary_loop: lend the appender (primary), start the failover side
//! run_backup_ft ──┘   (golive::PrimaryFt), run the VM one digest interval at a time; between
//!   │ (once live,      two runs: checkpoint, superseded?, alone?, a join's cut due
//!   │  with joins)     (join::cut) …; at power off: End, wait for its acknowledgement
//!   └─> golive::replay_ft ─> finished, or live: alone until power off
//!                                             or, with a join point, as a lone primary
//!                                             (running a primary's throttle)
//! ```
//!
//! # Why the loop lives here, above `golive` and `join`
//! The loop calls into both: into the primary's failover side ([`golive`](super::golive):
//! superseded, gone alone) and into the join's cut ([`join`](super::join), between two exits on
//! the vCPU thread). Both of those in turn build on the primary's logging
//! ([`primary`](super::primary): the writer, the appender lent to the VM) and a join replaces
//! the failover side of the run (`PrimaryFt::rejoin`). So the modules layer, each one using
//! only those below it: `primary` (logging, the output gate's use, the no-arbiter link watch)
//! → `golive` (the failover side of either role: detector, arbiter, going alone or live) →
//! `join` (re-protection: the join point, the cut, the acceptor, the joiner) → `run` (this
//! module: the loop and the runs that wire them). The join point is therefore not part of
//! [`FtConfig`]: a run is given it beside its failover settings.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ftvm_channel::GoodbyeReason;

use super::backup::LogReader;
use super::detector::DetectorStats;
use super::error::{PairError, SetupError};
use super::golive::{
    disk_superseded, replay_ft, BackupFtReport, FtConfig, PrimaryFt, Replayed, WentLive,
};
use super::join::{cut, JoinPoint};
use super::log::{AppliedControl, Entry, LOG_VERSION};
use super::observe::Observer;
use super::output::{OutputGate, Sink};
use super::primary::{
    DiskBarrier, Lent, LinkWatch, LogAppender, LogWriteError, LogWriter, PairOptions, PrimaryHooks,
    PrimaryReport,
};
use super::role::{PrimaryEvent, PrimaryState};
use super::stop::{is_planned, StopCause, Stopped};
use super::throttle::{Throttle, ThrottleConfig};
use super::transition::GoLiveTimings;
use ftvm_vmm_core::devices::virtio::blk::DiskMode;
use ftvm_vmm_core::digest::register_digest;
use ftvm_vmm_core::vm::{RunOutcome, Vm};

/// What [`run_primary_ft`] did.
#[derive(Debug, Clone)]
pub struct PrimaryFtReport {
    /// The primary's run (`backup_finished` is false and the log stops early if it went
    /// alone).
    pub report: PrimaryReport,
    /// `Some` if the backup failed and this primary went on alone.
    pub alone: Option<GoLiveTimings>,
    /// The generation this primary ended in.
    pub generation: u64,
    /// Failure detector counters.
    pub detector: DetectorStats,
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
    let r = primary_loop(vm, writer, opts, console, hooks, None, None);
    writer.end_run();
    r
}

/// Runs `vm` as the primary of a fault-tolerant pair: as [`run_primary`],
/// plus failure detection (UDP heartbeats to the backup, acknowledgements as traffic) and, when
/// the backup is presumed failed or the link is down, going alone after winning the next
/// generation: logging stops, held outputs are released, transmits go straight to the TAP, and
/// the VM runs on until it powers off. A primary that loses the take-over (or sees the backup
/// live in a newer generation) releases nothing more and stops with
/// [`PairError::Superseded`].
///
/// It first acquires `ft.generation` (idempotent for the node holding it): a stale primary
/// restarted after its backup took over is refused here.
///
/// With `join`, a backup may join whenever it runs alone ([`super::join`]: the cut is taken
/// between two exits, in this run's loop); the same point goes to its
/// [`JoinAcceptor`](super::join::JoinAcceptor).
///
/// # Errors
/// [`PairError`]; [`PairError::Superseded`] as above.
pub fn run_primary_ft(
    vm: &mut Vm,
    writer: &LogWriter,
    opts: &PairOptions,
    console: Option<(Arc<Mutex<Vec<u8>>>, Sink)>,
    hooks: &PrimaryHooks,
    (ft, join): (FtConfig, Option<JoinPoint>),
) -> Result<PrimaryFtReport, PairError> {
    let mut pft = PrimaryFt::new(ft)?;
    let report = primary_loop(
        vm,
        writer,
        opts,
        console,
        hooks,
        Some(&mut pft),
        join.as_ref(),
    );
    pft.stop_monitor();
    let ended = pft.superseded();
    // Before the run ends (ALONE becomes STOPPED).
    let alone = match writer.role().state() {
        PrimaryState::Alone(t) => t,
        _ => None,
    };
    writer.end_run();
    if let Some(e) = ended {
        return Err(e);
    }
    Ok(PrimaryFtReport {
        report: report?,
        alone,
        generation: pft.generation(),
        detector: pft.detector_stats(),
    })
}

/// Runs `vm` as the backup of a fault-tolerant pair: replays the log read by `reader` (as
/// [`run_backup`](super::backup::run_backup)) while a failure detector watches the primary.
/// When the log stops and the primary is presumed failed, it replays every entry received,
/// wins the next generation on the arbiter (waiting while it is unreachable), attaches
/// `ft.service_tap`, enables its outputs (`console`: bytes the guest prints from then on go to
/// the sink; transmits go to the TAP) and runs on as a lone primary until the guest powers off.
/// The replay and the decision are [`super::golive`]'s; what runs after it is here: alone, or,
/// with `join`, as a lone primary that a new backup may join (`live_as_primary` below).
///
/// # Errors
/// [`PairError`]: a divergence; [`PairError::Superseded`] if the primary took the next
/// generation instead (the backup stops without going live); [`PairError::LogEnded`] if the log
/// ended and no decision could be made; [`PairError::CannotTakeOver`] if its own disk copy
/// failed (it stopped without going live and told the primary).
pub fn run_backup_ft(
    vm: &mut Vm,
    reader: LogReader,
    (ft, join): (FtConfig, Option<JoinPoint>),
    console: Option<(Arc<Mutex<Vec<u8>>>, Sink)>,
) -> Result<BackupFtReport, PairError> {
    // The side's observer (what `--metrics` and the report show) stays the same when it goes
    // live and runs as a primary.
    let observer = reader.observer().clone();
    let live = match replay_ft(vm, reader, ft, console, join.is_some())? {
        Replayed::Finished(r) => return Ok(BackupFtReport::Finished(r)),
        Replayed::Live(live) => *live,
    };
    match join {
        None => live.run_alone(vm),
        Some(point) => live_as_primary(vm, live, &point, observer),
    }
}

/// A backup that went live and accepts joins ([`super::join`]) runs as a lone primary: a log
/// writer with no backup yet (alone: nothing is logged, outputs flow), the output gate of a
/// primary (console and transmits), and the join point, until the guest powers off.
fn live_as_primary(
    vm: &mut Vm,
    mut live: WentLive,
    point: &JoinPoint,
    observer: Observer,
) -> Result<BackupFtReport, PairError> {
    let console = live.take_console();
    let (p, c) =
        ftvm_ringbuf::with_capacity(point.log_capacity()).map_err(SetupError::LogBuffer)?;
    let sender = ftvm_channel::LogSender::detached(
        p,
        c,
        ftvm_channel::Config::default(),
        ftvm_channel::PollerConfig::default(),
    )?;
    let opts = PairOptions::default();
    let writer = LogWriter::with_observer(sender, opts.idle, observer);
    writer.role().step(PrimaryEvent::RunAlone)?;
    // The throttle a primary runs, on this (the vCPU's) thread; stopped on every way out of
    // this function (the guard's drop), which gives the vCPU its full share back, removes the
    // cgroup and records the final state in the join point.
    let throttle = LiveThrottle {
        throttle: point
            .throttle()
            .and_then(|cfg| start_throttle(cfg, &writer)),
        point,
    };
    // The first run completes the exit left pending where the replay ran out, live.
    let hooks = PrimaryHooks::default();
    let ft = (live.primary_config(), Some(point.clone()));
    let r = run_primary_ft(vm, &writer, &opts, console, &hooks, ft)?.report;
    drop(throttle);
    let mut report = live.report(vm, r.code, r.outputs);
    if let BackupFtReport::WentLive(l) = &mut report {
        l.throttle = point.throttle_status();
    }
    Ok(report)
}

/// The throttle of a live backup's run as a primary: stopped when dropped, its final state
/// recorded in the join point ([`JoinPoint::throttle_status`]: the report of a run that
/// ended in an error or a planned stop has it too).
struct LiveThrottle<'a> {
    throttle: Option<Throttle>,
    point: &'a JoinPoint,
}

impl Drop for LiveThrottle<'_> {
    fn drop(&mut self) {
        if let Some(t) = self.throttle.take() {
            self.point.record_throttle(t.stop());
        }
    }
}

/// Starts the CPU throttle of a backup that went live and now runs as a primary, acting on
/// this thread (the vCPU's) and obeying the writer's share cap (a join's auto-converge lever).
/// Where no cgroup is writable it paces alone ([`Throttle::for_writer`]).
///
/// Why a throttle that cannot start (its thread not spawned; the configuration was checked
/// when the process started) is a warning and not an error: the guest is live on this node
/// alone, with no other copy; stopping it would lose the service for the sake of a backup that
/// has not joined yet. It runs unthrottled (a join then has no auto-converge lever), and says so.
fn start_throttle(cfg: &ThrottleConfig, writer: &LogWriter) -> Option<Throttle> {
    match Throttle::on_this_thread(cfg, writer, "live as a primary") {
        Ok(t) => Some(t),
        Err(e) => {
            tracing::warn!(
                target: "ftvm::throttle",
                error = %ftvm_vmm_core::error_chain(&e),
                "live as a primary: cannot start the CPU throttle; running unthrottled (no auto-converge for joins)"
            );
            None
        }
    }
}

/// The primary's run; with `ft`, failure detection and going alone ([`super::golive`]), and
/// with `join` (and `ft`), joins served at their cut ([`super::join`]).
fn primary_loop(
    vm: &mut Vm,
    writer: &LogWriter,
    opts: &PairOptions,
    console: Option<(Arc<Mutex<Vec<u8>>>, Sink)>,
    hooks: &PrimaryHooks,
    mut ft: Option<&mut PrimaryFt>,
    join: Option<&JoinPoint>,
) -> Result<PrimaryReport, PairError> {
    let start = Instant::now();
    let acks = Arc::clone(writer.sender().shared());
    let gate = Arc::new(
        OutputGate::start(acks, Arc::clone(writer.position()))
            .map_err(SetupError::thread("output"))?,
    );
    if !gate.hook_into(writer.sender()) {
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
    let barrier = disk.as_ref().map(|d| DiskBarrier::install(writer, vm, d));
    let observer = writer.observer();
    observer.watch_exits(vm.stats());
    gate.observe_into(observer);
    let mut log = Lent::take(writer)?;
    log.get(vm)?.append(&Entry::Header {
        version: LOG_VERSION,
        digest_interval: opts.digest_interval,
        mem_digest_every: opts.mem_digest_every,
    })?;
    if let Some(f) = ft.as_deref_mut() {
        f.start(Arc::clone(&gate), writer, vm, opts.on_backup_stop)?;
        if let Some(point) = join {
            // Joins are served from now on (the join thread checks that this side is alone).
            point.set_writer(writer);
        }
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
    log.lend(vm);
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
            // Running alone: no more log entries, inputs straight from the devices (the
            // appender is kept: the link stays as it is).
            log.take_back(vm);
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
            if let Some(e) = disk_superseded(vm) {
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
        if let Some(e) = writer.error() {
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
                log_controls(writer, log.get(vm)?, exit)?;
                let mem = (opts.mem_digest_every > 0 && checkpoint % opts.mem_digest_every == 0)
                    .then(|| vm.memory_digest());
                let regs = register_digest(vm);
                log.get(vm)?.append(&Entry::Digest { exit, regs, mem })?;
                if let Some((at, gpa, data)) = &hooks.unlogged_write {
                    if *at == checkpoint {
                        use vm_memory::Bytes;
                        let _ = vm.memory().write_slice(data, vm_memory::GuestAddress(*gpa));
                    }
                }
            }
            RunOutcome::PoweredOff(code) => break Ok((Some(code), exit)),
            RunOutcome::ReplayExhausted { exit, .. } => {
                break Err(PairError::Setup(SetupError::PrimaryReplays { exit }))
            }
            // The FT monitor kicks the vCPU when this primary was superseded, the link watch
            // when the backup failed; a planned stop ([`super::stop`]) was asked for.
            RunOutcome::Paused => match ft.as_deref().and_then(PrimaryFt::superseded) {
                Some(e) => break Err(e),
                None if vm.stop_requested() => break Ok((None, exit)),
                // A joining backup asked for the cut ([`super::join`]): here, between exits.
                None if ft.is_some() && join.is_some_and(JoinPoint::due) => {
                    if let (Some(f), Some(point)) = (ft.as_deref_mut(), join) {
                        match cut(point, f, vm, (writer, &mut log), &gate, opts) {
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
    log.take_back(vm);
    vm.set_console_hook(None);
    if let Some(d) = &disk {
        d.set_mode(DiskMode::Direct);
    }
    let (code, exits) = result?;
    let Some(code) = code else {
        return Err(primary_stop(writer, &gate, ft, exits, opts.stop_timeout));
    };
    let mem_digest = vm.memory_digest();
    let regs_digest = register_digest(vm);
    let end = log.get(vm)?.append(&Entry::End {
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
                return Err(PairError::Log(LogWriteError::EndNotAcknowledged(
                    opts.ack_timeout,
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
                    return Err(PairError::Log(LogWriteError::EndNotAcknowledged(
                        opts.ack_timeout,
                    )));
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            // The pair ended normally (or alone): the link going down now is no failure.
            f.stop_monitor();
        }
    }
    if !gate.flush(opts.ack_timeout) {
        return Err(PairError::Log(LogWriteError::OutputsHeld));
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
fn log_controls(writer: &LogWriter, log: &mut LogAppender, exit: u64) -> Result<(), PairError> {
    for (key, value) in writer.controls().take_pending() {
        log.append(&Entry::Control { exit, key, value })?;
        writer.controls().apply(AppliedControl { exit, key, value });
    }
    Ok(())
}

/// The primary's side of a planned stop, once its vCPU stopped at exit `exit` (see the
/// [`stop`](crate::stop) module docs): waits (until `timeout`) for every logged entry to be acknowledged,
/// releases the held outputs, stops the FT monitor and says GOODBYE. Returns the error the
/// run ends with: [`PairError::Stopped`], or [`PairError::Superseded`] if this primary learned
/// meanwhile that it lost its generation.
pub(crate) fn primary_stop(
    writer: &LogWriter,
    gate: &OutputGate,
    ft: Option<&mut PrimaryFt>,
    exit: u64,
    timeout: Duration,
) -> PairError {
    let peer_left = writer.sender().peer_goodbye();
    let cause = match &peer_left {
        Some(g) if is_planned(g) => StopCause::PeerStopped(g.text.clone()),
        _ => StopCause::Requested,
    };
    let deadline = Instant::now() + timeout;
    let target = writer.position().load(std::sync::atomic::Ordering::Acquire);
    let acked_all = loop {
        if let Some(e) = ft.as_deref().and_then(PrimaryFt::superseded) {
            return e;
        }
        let s = writer.sender();
        if writer.is_alone() || s.acked_seq() >= target {
            break true;
        }
        if !s.is_running() || Instant::now() >= deadline {
            break false;
        }
        std::thread::sleep(Duration::from_micros(200));
    };
    if acked_all {
        gate.flush(deadline.saturating_duration_since(Instant::now()));
    }
    let held = gate.pending();
    if let Some(f) = ft {
        // Before the GOODBYE: the link going down is no failure now.
        f.stop_monitor();
        if let Some(e) = f.superseded() {
            return e;
        }
    }
    let told_peer = !writer.is_alone()
        && peer_left.is_none()
        && match writer
            .sender()
            .goodbye(GoodbyeReason::PlannedStop, "the primary stops as planned")
        {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "could not tell the backup that this primary stops");
                false
            }
        };
    tracing::info!(exit, held, told_peer, ?cause, "primary: planned stop");
    PairError::Stopped(Stopped {
        exit,
        cause,
        held,
        told_peer,
    })
}
