//! Go-live: a backup whose primary failed takes over, and a primary whose backup failed goes on
//! alone — both only after winning the next generation on the arbiter. The roles each side
//! passes through, and which transitions are allowed, are the state machines of
//! [`super::role`]; this module takes the decisions that step them.
//!
//! ```text
//! backup:  log stops (link error, or detector: primary failed ─> vCPU interrupted out of
//!          guest code) ─> stop receiving/acking                           REPLAYING ─> DRAINING
//!          ─> replay every entry received ─> log runs out at exit N (or between exits N-1, N):
//!             the vCPU returns to the run loop with exit N pending              ─> DECIDING
//!          ─> wait: detector says the primary failed (or the log link broke two failure
//!             timeouts ago) ─> take_over (generation g+1; waits while the arbiter is
//!             unreachable; lost ⇒ stop with PairError::Superseded)            ─> SUPERSEDED
//!          ─> attach the service TAP, TX direct, console released             ─> LIVE
//!          ─> inputs live; the run loop resumes the vCPU, which completes exit N live
//!          ─> runs as a lone primary until power off
//! primary: detector: backup failed, or link down ─> take_over (g+1)  WATCHED ─> GOING ALONE
//!          ─> won: stop logging, release every held output, TX direct, run alone  ─> ALONE
//!          ─> lost: fence the output gate (nothing more is released), stop        ─> FENCED
//! either:  a heartbeat claims a newer generation ─> read the arbiter (at most every 100 ms)
//!          ─> only if it names a newer generation held by another node: as "lost" above
//! backup (own disk copy): a disk result differs from the primary's ─> GOODBYE(CannotTakeOver)
//!          ─> stop (never live); primary: GOODBYE ─> as "backup failed" above
//! planned stops (SIGTERM; GOODBYE(PlannedStop)) are no failure: `super::stop`
//! ```
//!
//! Heartbeats carry liveness only (see the detector's threat model): the fence moves on
//! evidence from the arbiter (a generation read from it, a lost test-and-set) or from the
//! logging channel's generation check, never on what a UDP datagram says.
//!
//! # Where the replay stops, and why it is safe under the output rule
//! The backup goes live at the first point where its log has nothing more: at an external read
//! (clock, entropy, WAIT) whose entry is missing, at the end of an exit (it waits for an entry
//! of a later exit before leaving one), at a checkpoint, or between two exits inside guest
//! code (see "Deciding between two exits" below). There the replay source only reports that
//! it ran out, and the vCPU returns to the backup's run loop with that exit **pending**
//! ([`RunOutcome::ReplayExhausted`]; [`ftvm_vmm_core::vcpu`], "A replay that runs out pauses the run"):
//! the decision — which sleeps, polls the detector and calls the arbiter — runs in the run
//! loop, on the vCPU's thread but outside the exit handler. On winning, the VM's inputs become
//! live **at that point**: the run loop runs the vCPU on, the missing read is answered by the
//! device at the same exit index, and every later exit runs live. No exit is replayed in part
//! and then re-executed.
//!
//! Let `P` be the last log position the backup received (it stops its receiver first, so `P`
//! cannot move any more and nothing after `P` is acknowledged). Every output the primary
//! released was tagged with a position `≤ P` (it was released only once acknowledged), and was
//! produced by the primary's execution up to its tag — which the backup reproduced exactly,
//! since replay is deterministic given the entries `≤ P`. So the world has only seen outputs of
//! an execution the backup continues from. Entries the primary logged after `P` are lost with
//! it; they only describe inputs (packets received, clock values) no released output depends
//! on. Where the log ends inside an exit: the writes of that exit received so far are a prefix
//! in the order the device made them, and every device publishes its results (the used ring's
//! index) after the data, so a prefix is a consistent state (a packet whose index was not
//! published is simply not received — the network may drop packets); a WAIT whose value is
//! missing is answered live and the writes logged for it are dropped. Outputs the primary
//! produced but had not released, and those the backup produced while replaying (dropped),
//! may thus never appear or appear twice (the live backup re-sends what it produces after
//! going live): the network tolerates both, the guest's TCP retransmits.
//!
//! # Output-verified replay: the argument above, checked
//! The argument assumes replay is deterministic given the entries `≤ P`. A guest instruction
//! whose result nobody logged breaks that silently: RDRAND (not interceptable on AMD hosts
//! under PVM), RDTSC at CPL3 where the host does not enforce CR4.TSD (`guests/README.md`). So
//! the primary logs a digest of every output (console bytes, transmitted frames, shared-disk
//! writes: [`Entry::Output`](super::log::Entry::Output)) at the exit that produced it,
//! *before* tagging the output, and the backup compares its own (dropped) output at the same
//! exit. An output released to the world has its tag `≤ P`, and its digest's position is
//! `≤` its tag, so the backup has compared every released output before it holds no more
//! entries — which is the only moment it may decide to go live. Hence: **a backup goes live
//! only if every output any client saw was reproduced byte for byte by its own replay.**
//! Outputs the primary produced after `P` were never released and are not compared (their
//! digests are missing: the replay treats that like any missing entry).
//!
//! # A backup that diverged
//! Any difference — an output digest, a register or memory checkpoint, an unexpected exit —
//! means the backup's state is not a continuation of what the world saw, so it can never take
//! over. It stops at once with `diverged at exit N: …` (`ftvm backup`: exit status
//! `DIVERGED`, 202): whether the primary is alive (then the primary's failure detector sees
//! its backup gone and it goes on alone under the arbiter's rules, like after any backup
//! failure) or already dead (then the divergence is found while the backup drains its log
//! before deciding, and it refuses to go live: the service stays down rather than continue
//! from a state that contradicts what clients were told — the safe default; there is no
//! option to go live anyway). The decision is never reached: the replay runs out (and the run
//! loop decides) only once every held entry was replayed without a difference.
//!
//! A primary that goes alone keeps its state (nothing to replay); it releases what it held once
//! it won, and nothing at all once it learned it lost ([`Fence`] on the output gate).
//!
//! # Deciding between two exits: a guest without exits fails over too
//! The log holds entries only where an exit takes an input, and the replaying vCPU runs the
//! guest's code between exits on its own. At the end of every exit it waits until it holds an
//! entry of a later exit, but after the header and after each checkpoint's `Digest` it enters
//! guest code holding nothing further; a guest that then makes no exit for a long time (a
//! compute loop) would keep the vCPU inside `KVM_RUN` with no point to decide at, and the
//! backup would neither go live nor stop after its primary died. So the failure detector,
//! when it presumes the primary failed, interrupts the backup's vCPU
//! ([`VmControl::interrupt_replay`]: the kick signal sets `kvm_run.immediate_exit`, `KVM_RUN`
//! returns `EINTR`). At the next point between two exits — at once, if the vCPU was in guest
//! code — the replay source is asked
//! ([`ReplaySource::between_exits`](ftvm_vmm_core::record::ReplaySource::between_exits)):
//! - it still holds entries (of later exits: every entry of an exit is consumed by its end):
//!   the vCPU replays on and reaches them; the request stays set, so the source is asked again
//!   at every later point between exits (after the next checkpoint, say), besides the usual
//!   points above;
//! - it holds nothing, the receiver is stopped and drained: the log ends **here**; the vCPU
//!   returns to the run loop (nothing pending:
//!   [`ExhaustedAt::BetweenExits`](ftvm_vmm_core::vcpu::ExhaustedAt::BetweenExits)), and the
//!   decision runs at this point of the guest's instruction stream, as at an exit.
//!
//! Why this point is a valid continuation: `N` exits are complete (all their entries applied)
//! and exit `N` has not begun, so the backup's state is the primary's after its exit `N − 1`
//! plus guest instructions that take no input — a prefix of what the primary executed before
//! its own exit `N`. No entry the backup received belongs to exit `N` or later: whatever the
//! primary logged from exit `N` on lies beyond `P` and no released output depends on it. An
//! output of exit `N` that takes no input (a console write) was tagged `≤ P` and may have been
//! released by the primary; the live backup produces it again, byte for byte, when it
//! executes exit `N` (a duplicate, which the output rule allows).
//!
//! The exit index: the interruption is no exit. The vCPU loop counts only the guest's exits
//! (`ExitStats::total`); a `KVM_RUN` that returns `EINTR` is counted apart (`interrupts`) and
//! logs nothing. The same holds on the primary, whose vCPU is interrupted only to be stopped
//! (the FT monitor's kick when it was superseded) or by a stray signal (the throttle's pacer
//! pauses it at a log append, outside `KVM_RUN`). So exit `N` of the backup is exit `N` of
//! the primary however often either side was interrupted, and the first exit the live backup
//! makes has index `N`.
//!
//! # Own-copy mode: a backup whose disk copy failed never goes live
//! With its own image (the default), the replaying backup performs every disk request of the
//! guest on its copy itself, and the log carries the primary's result of each: the request's
//! status byte, a `Write` entry of the exit that performed it. A backup whose copy failed a
//! write the primary's disk took (ENOSPC, EIO, a short write) — or took one the primary's
//! failed — holds a disk that differs from the one the clients' acknowledged writes are on:
//! live on it, it would lose them (or bring back writes reported failed). So its virtio-blk
//! compares the two results at the end of every replayed exit, before any go-live decision
//! there ([`blk`](ftvm_vmm_core::devices::virtio::blk) module docs), and at the first difference the
//! VM stops and the backup
//! 1. says so: [`PairError::CannotTakeOver`] with the request, both statuses and its I/O error
//!    (`ftvm backup` prints `CANNOT TAKE OVER` and exits with status 206);
//! 2. tells the primary: a GOODBYE with reason `CannotTakeOver` on the logging channel;
//! 3. stops, without asking the arbiter for anything.
//!
//! The primary treats that as the failure of its backup, on the same path as a failure its
//! detector presumes (`BackupGone` → `Monitor::go_alone`): it wins the next generation,
//! releases what it held (its outputs no longer wait for a backup that could not take over)
//! and runs alone; without the GOODBYE (lost on the wire) the backup's silence leads there
//! after the failure timeout. Where the log ends inside an exit before the primary's status,
//! the backup's own result stands and the guest sees it live: the primary's completion of that
//! request lies beyond `P`, so no client was told anything that depends on it.
//!
//! # Shared-disk mode: why no acknowledged write is lost
//! Both sides name the same image; the primary performs a guest write only once the backup has
//! acknowledged every entry logged before it ([`DiskBarrier`](super::primary::DiskBarrier)),
//! and the replaying backup does not touch the disk. Going live (after winning the arbiter),
//! the backup takes the disk over ([`BlkHandle::go_live`]):
//! - a write whose completion (status byte, used ring: logged after the write was performed)
//!   the backup replayed was done by the primary, before anything it logged later;
//! - a write request the primary issued after the last entry the backup holds is executed by
//!   the backup itself when it runs that exit live (the primary had no input since that entry,
//!   so the backup issues the same request with the same data; writing it again is harmless);
//! - if the log ends inside a QueueNotify exit, the requests of that exit from the first one
//!   whose logged status is missing are executed by the backup at go-live, in order (only the
//!   first of them can have reached the disk: the primary waits for the acknowledgement of the
//!   previous request's completion before its next write).
//!
//! So the disk holds every write whose completion the guest saw (and any client was told
//! about), in order. The classic zombie write (a primary that passed the barrier, stalled for
//! longer than the failure timeout, then writes after the backup went live) is fenced off by
//! the image's owner record ([`owner`](ftvm_vmm_core::devices::virtio::owner)): each side takes it for
//! its generation ([`BlkHandle::take_ownership`]: the primary at its start and when it goes
//! alone, the backup before [`BlkHandle::go_live`]), and every write request holds its read
//! lock and is refused if a newer generation owns the disk. Its limit: a writer stopped while
//! holding the lock is waited for at most `owner::TAKE_PATIENCE` (2 s), then its one request
//! in progress can still land (`vmm-core/DEVICES.md`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::arbiter::{acquire_with_retry, take_over, Acquire, Arbiter, ArbiterError, RetryPolicy};
use super::backup::{backup_loop, BackupEnd, BackupReport, GoLiveHook, LogReader};
use super::detector::{Detector, DetectorConfig, DetectorEvent, DetectorStats, PeerState};
use super::error::{PairError, SetupError};
use super::fence::Fence;
use super::log::AppliedControl;
use super::node::{NodeId, Role};
use super::observe::SideRole;
use super::output::{OutputGate, OutputStats, Sink};
use super::primary::{release_alone, LogWriter, RELEASE_TIMEOUT};
use super::role::{
    BackupEvent, BackupGone, BackupRoleCell, BackupState, Fenced, PrimaryEvent, PrimaryRole,
    PrimaryRoleCell, PrimaryState,
};
use super::stop::{is_planned, BackupStopPolicy, PrimaryStopPolicy, StopCause, Stopped};
use super::throttle::ThrottleStatus;
use super::transition::{emit, GoLiveTimings, Transition, TransitionSink};
use ftvm_vmm_core::devices::virtio::blk::{BlkCounters, BlkError, BlkHandle};
use ftvm_vmm_core::devices::virtio::net::{NetHandle, TapError, TxCounters, TxMode};
use ftvm_vmm_core::digest::register_digest;
use ftvm_vmm_core::memory::GuestMem;
use ftvm_vmm_core::vm::{RunOutcome, Vm, VmControl};

/// The fault-tolerance settings of one side of a pair.
#[derive(Clone)]
pub struct FtConfig {
    /// The test-and-set both sides share (from [`super::arbiter::open`]).
    pub arbiter: Arc<dyn Arbiter>,
    /// This node's id on the arbiter.
    pub node: NodeId,
    /// The generation the pair starts in (held by the primary:
    /// [`run_primary_ft`](crate::run::run_primary_ft) acquires it, and refuses to run if
    /// another node holds it or a newer one). The channel's `Config::generation` must be the
    /// same.
    pub generation: u64,
    /// UDP heartbeats: local address, the peer's, interval and failure timeout (the role is set
    /// by the run function).
    pub detector: DetectorConfig,
    /// Back-off while the arbiter is unreachable.
    pub retry: RetryPolicy,
    /// Backup: the TAP it attaches when it goes live (the service interface the clients use;
    /// created persistent by the operator, `ip tuntap add NAME mode tap`, so that it survives
    /// the primary). `None`: no network after go-live.
    pub service_tap: Option<String>,
    /// Backup: what to do when the primary stops as planned (GOODBYE `PlannedStop`,
    /// [`super::stop`]): stop too (the default), or take over at once (a handover).
    pub on_primary_stop: PrimaryStopPolicy,
    /// Called with each failover decision of this side ([`super::transition`]); `None`: the
    /// decisions are only logged.
    pub on_transition: Option<TransitionSink>,
}

impl std::fmt::Debug for FtConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FtConfig")
            .field("node", &self.node)
            .field("generation", &self.generation)
            .field("detector", &self.detector)
            .field("retry", &self.retry)
            .field("service_tap", &self.service_tap)
            .field("on_primary_stop", &self.on_primary_stop)
            .finish_non_exhaustive()
    }
}

impl FtConfig {
    /// Settings with the default retry policy and no service TAP.
    pub fn new(
        arbiter: Arc<dyn Arbiter>,
        node: NodeId,
        generation: u64,
        detector: DetectorConfig,
    ) -> Self {
        FtConfig {
            arbiter,
            node,
            generation,
            detector,
            retry: RetryPolicy::default(),
            service_tap: None,
            on_primary_stop: PrimaryStopPolicy::Stop,
            on_transition: None,
        }
    }
}

/// What a backup that went live did.
#[derive(Debug, Clone)]
pub struct LiveReport {
    /// How going live went.
    pub timings: GoLiveTimings,
    /// Power-off code.
    pub code: u64,
    /// Exits in total (replayed and live).
    pub exits: u64,
    /// Log entries replayed.
    pub entries: u64,
    /// Controls applied while replaying.
    pub controls: Vec<AppliedControl>,
    /// Final memory digest.
    pub mem_digest: u64,
    /// Final register digest.
    pub regs_digest: u64,
    /// Console output released after going live.
    pub console: OutputStats,
    /// The console output replayed before going live (the primary's to release).
    pub console_replayed: Vec<u8>,
    /// Transmit counters of the net device (if any).
    pub tx: Option<TxCounters>,
    /// Shared-disk mode: the disk counters (`dropped` while replaying, `redone` at go-live,
    /// then `reads`/`writes` as a lone primary); `None`: the disk is not shared.
    pub disk: Option<BlkCounters>,
    /// Failure detector counters.
    pub detector: DetectorStats,
    /// Output digests of the primary that the backup's replayed outputs matched before it went
    /// live (all of them: a mismatch stops the replay first).
    pub outputs_verified: u64,
    /// Bytes of output they covered.
    pub output_bytes_verified: u64,
    /// The final state of the CPU throttle it ran as a primary after going live (with a join
    /// point carrying a throttle: [`JoinPoint::with_throttle`](crate::join::JoinPoint::with_throttle));
    /// `None`: no throttle ran.
    pub throttle: Option<ThrottleStatus>,
}

/// How [`run_backup_ft`](crate::run::run_backup_ft) ended.
#[derive(Debug, Clone)]
pub enum BackupFtReport {
    /// The primary ran to power off; the backup replayed the whole log.
    Finished(BackupReport),
    /// The primary failed; the backup went live and ran as a lone primary until power off.
    WentLive(Box<LiveReport>),
}

/// What a heartbeat claimed: the newest generation a heartbeat named (0: none newer than
/// ours). Only a reason to read the arbiter ([`ArbiterCheck`]); heartbeats are not evidence.
type Claimed = Arc<std::sync::atomic::AtomicU64>;

/// Starts the failure detector; a presumed failure of the peer sets `failed` and, on a backup
/// (`replaying`: its VM's control), takes the replaying vCPU out of guest code so that it
/// decides even if the guest makes no exit ([`VmControl::interrupt_replay`]).
fn spawn_detector(
    cfg: &FtConfig,
    role: Role,
    fence: &Fence,
    failed: &Arc<AtomicBool>,
    claimed: &Claimed,
    replaying: Option<VmControl>,
) -> Result<Arc<Detector>, PairError> {
    let mut dc = cfg.detector.clone();
    dc.role = role;
    let (f, claimed) = (Arc::clone(failed), Arc::clone(claimed));
    let sink = cfg.on_transition.clone();
    let detector = Detector::spawn(dc, fence.clone(), move |event| match event {
        DetectorEvent::PeerFailed { detection_time, .. } => {
            tracing::warn!(?detection_time, "peer presumed failed");
            emit(
                sink.as_ref(),
                Transition::PeerPresumedFailed {
                    silent_for: detection_time,
                },
            );
            f.store(true, Ordering::Release);
            if let Some(vm) = &replaying {
                vm.interrupt_replay();
            }
        }
        DetectorEvent::PeerRecovered { down_for } => {
            tracing::info!(?down_for, "peer alive again");
        }
        DetectorEvent::Superseded {
            peer_generation, ..
        } => {
            // Heartbeats carry liveness only: the claim is checked on the arbiter.
            claimed.fetch_max(peer_generation, Ordering::AcqRel);
        }
        DetectorEvent::RoleConflict { peer, ours } => {
            tracing::error!(?peer, ?ours, "both sides claim a live role");
        }
    })?;
    Ok(Arc::new(detector))
}

/// Least time between two arbiter reads made to check what heartbeats claimed: a flood of
/// forged claims costs the arbiter at most this rate.
const CLAIM_CHECK_EVERY: Duration = Duration::from_millis(100);

/// Checks, on the arbiter, the newer generations heartbeats claimed (rate-limited to one read
/// per [`CLAIM_CHECK_EVERY`]). The only evidence that this node was superseded is the arbiter
/// naming a newer generation held by another node.
struct ArbiterCheck {
    claimed: Claimed,
    /// The claim checked last (each claimed generation is checked once).
    checked: u64,
    last_read: Option<Instant>,
}

impl ArbiterCheck {
    fn new(claimed: Claimed) -> Self {
        ArbiterCheck {
            claimed,
            checked: 0,
            last_read: None,
        }
    }

    /// `Some((generation, winner))` if a heartbeat claimed a newer generation than `ours` and
    /// the arbiter confirms another node holds one.
    fn superseded(&mut self, cfg: &FtConfig, ours: u64) -> Option<(u64, String)> {
        let claim = self.claimed.load(Ordering::Acquire);
        if claim <= ours.max(self.checked) {
            return None;
        }
        if self
            .last_read
            .is_some_and(|t| t.elapsed() < CLAIM_CHECK_EVERY)
        {
            return None;
        }
        self.last_read = Some(Instant::now());
        match cfg.arbiter.current() {
            Ok(Some((g, w))) if g > ours && w != cfg.node => return Some((g, w.to_string())),
            Ok(current) => {
                self.checked = claim;
                tracing::warn!(
                    claimed = claim,
                    ours,
                    arbiter = ?current.map(|(g, _)| g),
                    "a heartbeat claimed a newer generation the arbiter does not confirm: ignored \
                     (forged or misdirected heartbeat)"
                );
            }
            // Unreachable: checked again at the next call.
            Err(e) => tracing::warn!(error = %e, "cannot check a claimed generation"),
        }
        None
    }
}

/// Who a side superseded on the shared disk's owner record lost to.
const DISK_OWNER: &str = "the owner of the shared disk";

/// Takes `disk`'s owner record for `generation` ([`BlkHandle::take_ownership`]).
fn take_disk(disk: &BlkHandle, generation: u64) -> Result<(), PairError> {
    match disk.take_ownership(generation) {
        Ok(_) => Ok(()),
        Err(BlkError::Superseded { owner, .. }) => Err(PairError::Superseded {
            generation: owner,
            winner: DISK_OWNER.into(),
        }),
        Err(e) => Err(PairError::Setup(SetupError::Disk(e))),
    }
}

/// `Some(Superseded)` if the VM's shared disk refused a write because its owner record holds a
/// newer generation (the VM stopped with a device error).
pub(crate) fn disk_superseded(vm: &Vm) -> Option<PairError> {
    vm.shared_disk()
        .and_then(BlkHandle::superseded_by)
        .map(|generation| PairError::Superseded {
            generation,
            winner: DISK_OWNER.into(),
        })
}

// ---------------------------------------------------------------------------------------------
// Primary
// ---------------------------------------------------------------------------------------------

/// The fault-tolerance side of a primary's run (used by its loop, [`crate::run`]). What it decides
/// goes into the primary's role ([`LogWriter::role`], [`super::role`]).
pub(crate) struct PrimaryFt {
    cfg: FtConfig,
    fence: Fence,
    detector: Arc<Detector>,
    /// The detector's verdict on the backup (an input of the monitor, not a role).
    failed: Arc<AtomicBool>,
    claimed: Claimed,
    /// The primary's role, once [`PrimaryFt::start`] was given the writer.
    role: Option<PrimaryRoleCell>,
    /// Ends the monitor thread (the run ended, or this side was replaced by a join); not a
    /// role.
    stop: Arc<AtomicBool>,
    monitor: Option<JoinHandle<()>>,
}

impl PrimaryFt {
    /// Acquires `cfg.generation` (idempotent for its holder) and starts the failure detector.
    pub(crate) fn new(cfg: FtConfig) -> Result<Self, PairError> {
        let outcome =
            acquire_with_retry(&*cfg.arbiter, cfg.generation, &cfg.node, cfg.retry, || {
                false
            })?;
        if let Acquire::Lost { generation, winner } = outcome {
            return Err(PairError::Superseded {
                generation,
                winner: winner.to_string(),
            });
        }
        let fence = Fence::new(cfg.generation);
        let failed = Arc::new(AtomicBool::new(false));
        let claimed = Claimed::default();
        let detector = spawn_detector(&cfg, Role::Primary, &fence, &failed, &claimed, None)?;
        Ok(PrimaryFt {
            cfg,
            fence,
            detector,
            failed,
            claimed,
            role: None,
            stop: Arc::new(AtomicBool::new(false)),
            monitor: None,
        })
    }

    /// Fences `gate`, lets failures of the link be decided here, starts the monitor thread.
    pub(crate) fn start(
        &mut self,
        gate: Arc<OutputGate>,
        writer: &LogWriter,
        vm: &Vm,
        on_backup_stop: BackupStopPolicy,
    ) -> Result<(), PairError> {
        if let Some(d) = vm.shared_disk() {
            // Storage fencing: the shared disk is this primary's in its generation.
            take_disk(d, self.cfg.generation)?;
        }
        gate.set_fence(self.fence.clone(), self.cfg.generation);
        self.detector.observe_into(writer.observer());
        writer.observer().set_generation(self.cfg.generation);
        writer.role().set_sink(self.cfg.on_transition.clone());
        self.role = Some(writer.role().clone());
        if writer.is_alone() {
            // A backup that went live runs as a lone primary (to take a backup that joins):
            // outputs flow, and there is no backup to watch until one joins.
            gate.release_all(self.cfg.generation);
            writer
                .observer()
                .set_role(SideRole::Alone, self.cfg.generation);
            return Ok(());
        }
        writer.role().step(PrimaryEvent::Watch)?;
        self.spawn_monitor(gate, writer, vm, on_backup_stop, None)
    }

    /// This primary's settings (the arbiter, the detector's addresses, its generation at the
    /// start).
    pub(crate) fn config(&self) -> &FtConfig {
        &self.cfg
    }

    /// The generation this primary is in now (its fence's: it moves on when it goes alone).
    pub(crate) fn generation(&self) -> u64 {
        self.fence.current()
    }

    /// The failure detector's counters.
    pub(crate) fn detector_stats(&self) -> DetectorStats {
        self.detector.stats()
    }

    /// The heartbeat address of this side's failure detector.
    pub(crate) fn heartbeat_addr(&self) -> std::net::SocketAddr {
        self.detector.local_addr()
    }

    /// A joined backup replaces the one that failed ([`super::join`]): `next` (the new
    /// generation, won on the arbiter, and a detector aimed at the new backup) takes this one's
    /// place; the shared disk is taken for it, outputs wait for acknowledgements again (and
    /// the net device's transmits with them), appends go to the log again, and the monitor
    /// starts once `armed` says whether the new backup's link came up (`false`, or the sender
    /// dropped: the backup is gone, and this primary goes alone again by the usual path).
    /// Returns the replaced side (to be dropped off the vCPU thread: its detector's thread is
    /// joined on drop).
    pub(crate) fn rejoin(
        &mut self,
        next: PrimaryFt,
        (gate, writer, vm): (Arc<OutputGate>, &LogWriter, &Vm),
        on_backup_stop: BackupStopPolicy,
        armed: std::sync::mpsc::Receiver<bool>,
    ) -> Result<PrimaryFt, PairError> {
        let old = std::mem::replace(self, next);
        let generation = self.cfg.generation;
        if let Some(d) = vm.shared_disk() {
            take_disk(d, generation)?;
        }
        gate.set_fence(self.fence.clone(), generation);
        gate.gate_again();
        if let Some(net) = vm.net() {
            gate.gate_net(net);
        }
        writer.role().step(PrimaryEvent::Rejoined)?;
        self.role = Some(writer.role().clone());
        self.detector.observe_into(writer.observer());
        writer.observer().set_role(SideRole::Primary, generation);
        self.spawn_monitor(gate, writer, vm, on_backup_stop, Some(armed))?;
        Ok(old)
    }

    fn spawn_monitor(
        &mut self,
        gate: Arc<OutputGate>,
        writer: &LogWriter,
        vm: &Vm,
        on_backup_stop: BackupStopPolicy,
        armed: Option<std::sync::mpsc::Receiver<bool>>,
    ) -> Result<(), PairError> {
        let m = Monitor {
            cfg: self.cfg.clone(),
            fence: self.fence.clone(),
            detector: Arc::clone(&self.detector),
            failed: Arc::clone(&self.failed),
            claims: ArbiterCheck::new(Arc::clone(&self.claimed)),
            stop: Arc::clone(&self.stop),
            writer: writer.clone(),
            gate,
            net: vm.net().cloned(),
            disk: vm.shared_disk().cloned(),
            control: vm.control(),
            on_backup_stop,
            armed,
        };
        self.monitor = Some(
            std::thread::Builder::new()
                .name("ft-primary-monitor".into())
                .spawn(move || m.run())
                .map_err(SetupError::thread("FT monitor"))?,
        );
        Ok(())
    }

    /// The error to stop with if this primary was fenced: superseded (lost the take-over, or
    /// saw a newer generation) or the arbiter failed. (A newer generation seen after going
    /// alone needs no role: the gate's fence already refuses every output.)
    pub(crate) fn superseded(&self) -> Option<PairError> {
        let role = self.role.as_ref()?;
        if !role.is(PrimaryRole::Fenced) {
            return None;
        }
        match role.state() {
            PrimaryState::Fenced(Fenced::Superseded { generation, winner }) => {
                Some(PairError::Superseded { generation, winner })
            }
            PrimaryState::Fenced(Fenced::Arbiter(e)) => Some(PairError::Arbiter(e)),
            _ => None,
        }
    }

    /// Stops the monitor (the pair ended normally; the link going down is no failure now).
    pub(crate) fn stop_monitor(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.monitor.take() {
            let _ = t.join();
        }
    }
}

impl Drop for PrimaryFt {
    fn drop(&mut self) {
        self.stop_monitor();
    }
}

/// The primary's FT monitor thread: watches the detector and the link; goes alone or stops.
struct Monitor {
    cfg: FtConfig,
    fence: Fence,
    detector: Arc<Detector>,
    failed: Arc<AtomicBool>,
    claims: ArbiterCheck,
    stop: Arc<AtomicBool>,
    writer: LogWriter,
    gate: Arc<OutputGate>,
    net: Option<NetHandle>,
    disk: Option<BlkHandle>,
    control: VmControl,
    /// What a backup's planned stop means here.
    on_backup_stop: BackupStopPolicy,
    /// After a join: whether the new backup's link came up ([`PrimaryFt::rejoin`]); the
    /// monitor watches only from then on.
    armed: Option<std::sync::mpsc::Receiver<bool>>,
}

impl Monitor {
    /// After a join, waits until the new backup's link is up (`true`) or failed.
    fn wait_armed(&mut self) -> bool {
        let Some(armed) = self.armed.take() else {
            return true;
        };
        loop {
            if self.stop.load(Ordering::Acquire) {
                return false;
            }
            match armed.recv_timeout(Duration::from_millis(10)) {
                Ok(up) => {
                    // The detector ran while the new backup was still being built: only
                    // silence from now on counts.
                    self.failed.store(false, Ordering::Release);
                    if !up {
                        self.go_alone(&BackupGone::LinkDown);
                    }
                    return up;
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    self.go_alone(&BackupGone::LinkDown);
                    return false;
                }
            }
        }
    }

    fn run(mut self) {
        if !self.wait_armed() {
            return;
        }
        let mut last_acked = 0;
        while !self.stop.load(Ordering::Acquire) {
            let (running, acked, goodbye) = {
                let s = self.writer.sender();
                (s.is_running(), s.acked_seq(), s.peer_goodbye())
            };
            if acked != last_acked {
                // Acknowledgements moving: the backup is alive.
                self.detector.note_traffic();
                last_acked = acked;
            }
            if let Some((g, winner)) = self.claims.superseded(&self.cfg, self.cfg.generation) {
                // A heartbeat claimed a newer generation and the arbiter confirms it: the
                // backup went live.
                self.lose(g, winner);
                return;
            }
            let gone = match goodbye {
                Some(g) => Some(BackupGone::Left(g)),
                None if self.failed.load(Ordering::Acquire) => Some(BackupGone::Failed),
                None if !running => Some(BackupGone::LinkDown),
                None => None,
            };
            if let Some(BackupGone::Left(g)) = &gone {
                if is_planned(g) && self.on_backup_stop == BackupStopPolicy::Stop {
                    tracing::warn!(goodbye = %g, "the backup stopped as planned: this primary stops too");
                    self.control.request_stop();
                    return;
                }
            }
            if let Some(gone) = gone {
                self.go_alone(&gone);
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn lose(&self, generation: u64, winner: String) {
        self.fence.advance(generation);
        tracing::error!(
            generation,
            %winner,
            "this primary lost the take-over: no output is released any more; stopping"
        );
        // FENCED (appends fail from here on); the role emits LostTakeOver.
        self.writer.step(PrimaryEvent::Lost { generation, winner });
        self.writer
            .observer()
            .set_role(SideRole::Fenced, generation);
        self.control.kick();
    }

    /// The backup is gone (`gone` says how): win the next generation, then go on alone — or
    /// stop, if it was lost. The one path for every way a backup can be gone: WATCHED →
    /// GOING ALONE → ALONE or FENCED ([`super::role`]).
    fn go_alone(&self, gone: &BackupGone) {
        let t_failed = Instant::now();
        let detection = if self.detector.peer_state() == PeerState::Failed {
            self.detector.stats().last_detection.unwrap_or_default()
        } else {
            Duration::ZERO
        };
        let at_exit = self.control.exits();
        match gone {
            BackupGone::Left(goodbye) if is_planned(goodbye) => tracing::warn!(
                %goodbye,
                at_exit,
                "UNPROTECTED: the backup stopped as planned; taking over the next generation \
                 and going on ALONE (no backup, no failover until a new pair is started)"
            ),
            BackupGone::Left(goodbye) => tracing::error!(
                %goodbye,
                at_exit,
                "the backup left the pair: taking over the next generation before going \
                 alone (outputs no longer wait for it)"
            ),
            _ => tracing::warn!(
                ?gone,
                ?detection,
                at_exit,
                "the backup is presumed failed: taking over the next generation before going \
                 alone"
            ),
        }
        // GOING ALONE (a backup that left unplanned: the role emits BackupLeft).
        if !self.writer.step(PrimaryEvent::BackupGone(gone.clone())) {
            return;
        }
        let stop = Arc::clone(&self.stop);
        let r = take_over(
            &*self.cfg.arbiter,
            &self.fence,
            &self.cfg.node,
            self.cfg.retry,
            move || stop.load(Ordering::Acquire),
        );
        let t_won = Instant::now();
        match r {
            Ok((generation, Acquire::Won)) => {
                if let Some(d) = &self.disk {
                    // The disk is ours in the new generation before a write passes unheld.
                    if let Err(e) = take_disk(d, generation) {
                        let g = match e {
                            PairError::Superseded { generation: g, .. } => g,
                            _ => generation,
                        };
                        tracing::error!(error = %e, "cannot take the shared disk");
                        self.lose(g, DISK_OWNER.into());
                        return;
                    }
                }
                // ALONE before the release: a vCPU waiting for log space (or inside a transmit)
                // must see that nothing is logged any more.
                self.writer.step(PrimaryEvent::Won);
                release_alone(&self.gate, self.net.as_ref(), generation);
                let t_drained = Instant::now();
                self.detector.set_role(Role::Alone);
                let timings = GoLiveTimings {
                    generation,
                    at_exit,
                    detection,
                    drain: t_drained - t_won,
                    wait_detector: Duration::ZERO,
                    arbiter: t_won - t_failed,
                    attach: Duration::ZERO,
                    total: t_drained - t_failed + detection,
                };
                tracing::info!(?timings, "primary goes on alone");
                // The role keeps the timings and emits Alone.
                self.writer.step(PrimaryEvent::Released(timings));
                self.writer.observer().set_role(SideRole::Alone, generation);
            }
            Ok((_, Acquire::Lost { generation, winner })) => {
                self.lose(generation, winner.to_string());
            }
            Err(ArbiterError::Stopped) => {}
            Err(e) => {
                tracing::error!(error = %e, "arbiter failed: this primary stops");
                self.writer.step(PrimaryEvent::ArbiterFailed(Arc::new(e)));
                self.control.kick();
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Backup
// ---------------------------------------------------------------------------------------------

/// The backup's go-live decision: taken by the backup's run loop, on the vCPU thread, while
/// the VM is paused where its replay ran out ([`ftvm_vmm_core::vcpu`], "A replay that runs out pauses
/// the run"). Its outcome is the backup's role ([`super::role`], "The backup").
struct BackupGoLive {
    cfg: FtConfig,
    /// Once live, this side becomes a primary that accepts joins ([`crate::run`]).
    serves_joins: bool,
    /// The VM's control: a stop requested here means no go-live ([`super::stop`]).
    control: VmControl,
    fence: Fence,
    detector: Arc<Detector>,
    /// The detector's verdict on the primary (an input of the decision, not a role).
    failed: Arc<AtomicBool>,
    /// The backup's role.
    role: BackupRoleCell,
    /// Entries the replay consumed when the log ran out (the reader is gone once live).
    consumed: u64,
    net: Option<NetHandle>,
    /// Shared-disk mode: the disk this side takes over when it goes live, and guest memory
    /// (for the requests of the last exit whose completion the log lacked).
    disk: Option<(BlkHandle, GuestMem)>,
    console: Option<(Arc<Mutex<Vec<u8>>>, Sink)>,
    console_gate: Option<OutputGate>,
    console_replayed: Vec<u8>,
}

impl BackupGoLive {
    /// SUPERSEDED (the role emits LostTakeOver).
    fn lost(&mut self, generation: u64, winner: String) -> Result<(), PairError> {
        tracing::error!(
            generation,
            %winner,
            "the backup lost the take-over: it does not go live"
        );
        self.role.step(BackupEvent::Lost {
            generation,
            winner: winner.clone(),
        })?;
        Err(PairError::Superseded { generation, winner })
    }

    /// FAILED, with `e`.
    fn fail(&mut self, e: PairError) -> Result<(), PairError> {
        self.role.step(BackupEvent::Fail)?;
        Err(e)
    }

    /// After the replay ended with `e` (not through the decision, which steps its own
    /// outcome): STOPPED for a planned stop, FAILED otherwise.
    fn settle(&self, e: &PairError) {
        use super::role::BackupRole as R;
        if matches!(self.role.role(), R::Replaying | R::Draining | R::Deciding) {
            let event = match e {
                PairError::Stopped(_) => BackupEvent::Stop,
                _ => BackupEvent::Fail,
            };
            if let Err(e) = self.role.step(event) {
                tracing::warn!(error = %e, "backup role: transition refused");
            }
        }
    }

    /// The timings of going live (default before).
    fn timings(&self) -> GoLiveTimings {
        match self.role.state() {
            BackupState::Live(t) => t,
            _ => GoLiveTimings::default(),
        }
    }

    /// A planned stop instead of a decision, if one applies: this side was asked to stop, or
    /// the primary stopped as planned and this backup is not to take over. `handover`: the
    /// primary stopped as planned and this backup takes over at once.
    fn planned_stop(
        &mut self,
        exit: u64,
        handover: &mut bool,
        reader: &LogReader,
    ) -> Option<PairError> {
        let cause = if self.control.stop_requested() {
            StopCause::Requested
        } else {
            match reader.receiver().peer_goodbye().filter(is_planned) {
                None => return None,
                Some(_) if self.cfg.on_primary_stop == PrimaryStopPolicy::TakeOver => {
                    tracing::warn!(
                        exit,
                        "the primary stopped as planned: taking over (handover)"
                    );
                    *handover = true;
                    return None;
                }
                Some(g) => StopCause::PeerStopped(g.text),
            }
        };
        tracing::warn!(exit, ?cause, "planned stop: the backup does not go live");
        Some(PairError::Stopped(Stopped {
            exit,
            cause,
            held: 0,
            told_peer: false,
        }))
    }

    /// DECIDING at `exit`, then LIVE — or why not.
    fn decide_at(&mut self, exit: u64, reader: &mut LogReader) -> Result<(), PairError> {
        self.consumed = reader.consumed();
        let mut handover = false;
        if let Some(stop) = self.planned_stop(exit, &mut handover, reader) {
            self.role.step(BackupEvent::Stop)?;
            return Err(stop);
        }
        self.role.step(BackupEvent::RanOut { exit })?;
        let t_out = Instant::now();
        // Nothing more may be received or acknowledged from here on.
        reader.sever();
        let lost_at = reader.lost_at().unwrap_or(t_out);
        tracing::warn!(
            exit,
            drained_ms = (t_out - lost_at).as_millis() as u64,
            "the log ran out; waiting for the failure detector"
        );
        // 1. The primary must be presumed failed (a log link that broke while the primary
        //    lives is decided by the primary: it takes the next generation and we lose).
        //    Heartbeats alone cannot hold this back for long: the log link is the stronger
        //    signal, and once it broke, a primary that is alive takes the next generation at
        //    once (its link broke too) — so after two failure timeouts without a decision,
        //    the backup contests the next generation whatever the heartbeats say (forged ones
        //    included; the arbiter keeps that safe: see the detector's threat model).
        //    A handover (the primary stopped as planned and said so) needs no detector.
        let contest_after = 2 * self.cfg.detector.timeout;
        let mut last_check = Instant::now();
        while !handover && !self.failed.load(Ordering::Acquire) {
            if lost_at.elapsed() >= contest_after {
                tracing::warn!(
                    since_log_lost_ms = lost_at.elapsed().as_millis() as u64,
                    "the log link is down and the primary has not taken the next generation, \
                     though its heartbeats still arrive: contesting the next generation"
                );
                break;
            }
            if last_check.elapsed() >= CLAIM_CHECK_EVERY {
                last_check = Instant::now();
                if let Ok(Some((g, w))) = self.cfg.arbiter.current() {
                    if g > self.cfg.generation && w != self.cfg.node {
                        return self.lost(g, w.to_string());
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let t_failed = Instant::now();
        // 2. The test-and-set (waits while the arbiter is unreachable; never live without it).
        let (generation, outcome) = match take_over(
            &*self.cfg.arbiter,
            &self.fence,
            &self.cfg.node,
            self.cfg.retry,
            || false,
        ) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "arbiter failed: the backup does not go live");
                return self.fail(e.into());
            }
        };
        if let Acquire::Lost { generation, winner } = outcome {
            return self.lost(generation, winner.to_string());
        }
        let t_won = Instant::now();
        // 3. The shared disk is ours now (never before winning): first its owner record (a
        //    zombie write of the old primary is refused from here on), then the requests the
        //    log left incomplete.
        if let Some((disk, mem)) = &self.disk {
            match take_disk(disk, generation) {
                Ok(()) => {}
                Err(PairError::Superseded { generation, winner }) => {
                    return self.lost(generation, winner);
                }
                Err(e) => return self.fail(e),
            }
            disk.go_live(exit, mem);
        }
        // 4. Outputs and the service address.
        self.detector.set_role(Role::Alone);
        if let Some(net) = &self.net {
            if let Some(tap) = &self.cfg.service_tap {
                if let Err(source) = attach_when_free(net, tap) {
                    tracing::error!(error = %source, tap = %tap, "cannot attach the service TAP");
                    return self.fail(PairError::Setup(SetupError::Tap {
                        generation,
                        tap: tap.clone(),
                        source,
                    }));
                }
            }
            net.set_tx(TxMode::Direct);
        }
        if let Some((buf, sink)) = self.console.take() {
            // What was replayed was the primary's to release; from here on the output is ours.
            self.console_replayed =
                std::mem::take(&mut *buf.lock().unwrap_or_else(|e| e.into_inner()));
            if self.serves_joins {
                // It goes through the output gate of the primary this side becomes
                // ([`crate::run`]), to wait for a backup that joins.
                self.console = Some((buf, sink));
                return self.went_live(
                    (exit, generation),
                    (lost_at, t_out, t_failed, t_won),
                    reader,
                );
            }
            let acks: Arc<dyn super::output::AckSource> =
                Arc::new(std::sync::atomic::AtomicU64::new(u64::MAX));
            match OutputGate::start(acks, Arc::default()) {
                Ok(gate) => {
                    gate.add_buffer_source(buf, sink);
                    self.console_gate = Some(gate);
                }
                Err(e) => tracing::error!(error = %e, "console output thread"),
            }
        }
        self.went_live(
            (exit, generation),
            (lost_at, t_out, t_failed, t_won),
            reader,
        )
    }

    /// LIVE, with the timings of going live (`lost_at`: the log stopped, `t_out`: the replay
    /// ran out, `t_failed`: the primary presumed failed, `t_won`: the arbiter won); the role
    /// emits Live.
    fn went_live(
        &mut self,
        (exit, generation): (u64, u64),
        (lost_at, t_out, t_failed, t_won): (Instant, Instant, Instant, Instant),
        reader: &LogReader,
    ) -> Result<(), PairError> {
        let detection = self.detector.stats().last_detection.unwrap_or_default();
        let t_live = Instant::now();
        let first_sign = lost_at.min(t_failed.checked_sub(detection).unwrap_or(t_failed));
        let timings = GoLiveTimings {
            generation,
            at_exit: exit,
            detection,
            drain: t_out.saturating_duration_since(lost_at),
            wait_detector: t_failed - t_out,
            arbiter: t_won - t_failed,
            attach: t_live - t_won,
            total: t_live.saturating_duration_since(first_sign),
        };
        tracing::info!(?timings, "the backup is live");
        self.role.step(BackupEvent::Won(timings))?;
        reader.observer().set_role(SideRole::Alone, generation);
        if let Some(g) = &self.console_gate {
            g.observe_into(reader.observer());
        }
        Ok(())
    }
}

impl GoLiveHook for BackupGoLive {
    fn decide(&mut self, exit: u64, reader: &mut LogReader) -> Result<(), PairError> {
        self.decide_at(exit, reader)
    }
}

/// How the replay of a backup with failover ended ([`replay_ft`]).
pub(crate) enum Replayed {
    /// The primary ran to power off; the backup replayed the whole log.
    Finished(BackupReport),
    /// The primary failed and the backup went live: its VM is paused where the replay ran
    /// out, its inputs live, the exit left pending there still to complete.
    Live(Box<WentLive>),
}

/// Replays the log read by `reader` into `vm` as the backup of a fault-tolerant pair, while a
/// failure detector watches the primary, up to its end or to going live (the decision:
/// [`BackupGoLive`]). `serves_joins`: the side becomes a primary that accepts joins once live
/// (its console then goes through that primary's output gate).
///
/// # Errors
/// As [`run_backup_ft`](crate::run::run_backup_ft) before going live.
pub(crate) fn replay_ft(
    vm: &mut Vm,
    mut reader: LogReader,
    ft: FtConfig,
    console: Option<(Arc<Mutex<Vec<u8>>>, Sink)>,
    serves_joins: bool,
) -> Result<Replayed, PairError> {
    let fence = Fence::new(ft.generation);
    let failed = Arc::new(AtomicBool::new(false));
    // A backup checks the arbiter itself while it decides (below); claims need no reader.
    let detector = spawn_detector(
        &ft,
        Role::Backup,
        &fence,
        &failed,
        &Claimed::default(),
        Some(vm.control()),
    )?;
    let role = BackupRoleCell::new(BackupState::Replaying);
    role.set_sink(ft.on_transition.clone());
    reader.watch(Arc::clone(&failed), detector.traffic(), role.clone());
    detector.observe_into(reader.observer());
    reader.observer().set_generation(ft.generation);
    // Shared counters: read after the run, whatever became of the reader.
    let (controls, checks) = (reader.controls().clone(), reader.output_checks());
    let mut golive = BackupGoLive {
        cfg: ft,
        serves_joins,
        control: vm.control(),
        fence,
        detector: Arc::clone(&detector),
        failed,
        role,
        consumed: 0,
        net: vm.net().cloned(),
        disk: vm.shared_disk().map(|d| (d.clone(), vm.memory().clone())),
        console,
        console_gate: None,
        console_replayed: Vec::new(),
    };
    let exit = match backup_loop(vm, reader, Some(&mut golive)) {
        Ok(BackupEnd::Finished(r)) => {
            golive.role.step(BackupEvent::Finish)?;
            return Ok(Replayed::Finished(r));
        }
        Ok(BackupEnd::Live { exit }) => exit,
        Err(e) => {
            golive.settle(&e);
            return Err(e);
        }
    };
    // LIVE: the VM is paused where the replay ran out, its inputs live; the replay source, and
    // with it the reader (the receiver), went with the go-live.
    tracing::info!(exit, "running as a lone primary");
    Ok(Replayed::Live(Box::new(WentLive {
        entries: golive.consumed,
        controls: controls.applied(),
        checks,
        golive,
        detector,
    })))
}

/// A backup that went live ([`Replayed::Live`]), before it runs on: alone until the guest
/// powers off ([`WentLive::run_alone`]), or as a primary that accepts joins
/// ([`crate::run`]).
pub(crate) struct WentLive {
    golive: BackupGoLive,
    detector: Arc<Detector>,
    /// Log entries replayed.
    entries: u64,
    /// Controls applied while replaying.
    controls: Vec<AppliedControl>,
    checks: super::backup::OutputChecks,
}

impl WentLive {
    /// Runs the live VM until the guest powers off; the first run completes the exit left
    /// pending, live.
    ///
    /// # Errors
    /// [`PairError`]: the VM failed, was stopped, or its shared disk was superseded.
    pub(crate) fn run_alone(mut self, vm: &mut Vm) -> Result<BackupFtReport, PairError> {
        let code = loop {
            let r = vm.run();
            if r.is_err() {
                if let Some(e) = disk_superseded(vm) {
                    return Err(e);
                }
            }
            match r? {
                RunOutcome::PoweredOff(code) => break code,
                RunOutcome::Paused => return Err(paused_or_stopped(vm)),
                RunOutcome::ExitLimit | RunOutcome::ReplayExhausted { .. } => {}
            }
        };
        let console = match self.golive.console_gate.take() {
            Some(gate) => {
                gate.flush(RELEASE_TIMEOUT);
                gate.stats()
            }
            None => OutputStats::default(),
        };
        Ok(self.report(vm, code, console))
    }

    /// The console of the VM (its buffer and the sink for what it prints from now on), for
    /// the output gate of the primary this side becomes.
    pub(crate) fn take_console(&mut self) -> Option<(Arc<Mutex<Vec<u8>>>, Sink)> {
        self.golive.console.take()
    }

    /// The failover settings of the lone primary this side becomes: the generation it won,
    /// and a failure detector of its own for a backup that joins.
    pub(crate) fn primary_config(&self) -> FtConfig {
        let mut cfg = self.golive.cfg.clone();
        cfg.generation = self.golive.timings().generation;
        // The backup's detector keeps its address; this side's, for a backup that joins, takes
        // another (the join tells the joiner).
        cfg.detector.bind = std::net::SocketAddr::new(cfg.detector.bind.ip(), 0);
        cfg.detector.role = Role::Alone;
        cfg
    }

    /// The report once the guest powered off with `code`, `console`: the console output
    /// released after going live.
    pub(crate) fn report(mut self, vm: &mut Vm, code: u64, console: OutputStats) -> BackupFtReport {
        let checks = &self.checks;
        BackupFtReport::WentLive(Box::new(LiveReport {
            timings: self.golive.timings(),
            code,
            exits: vm.stats().total(),
            entries: self.entries,
            controls: std::mem::take(&mut self.controls),
            mem_digest: vm.memory_digest(),
            regs_digest: register_digest(vm),
            console,
            console_replayed: std::mem::take(&mut self.golive.console_replayed),
            tx: vm.net().map(NetHandle::tx_counters),
            disk: vm.shared_disk().map(BlkHandle::counters),
            detector: self.detector.stats(),
            outputs_verified: checks.verified_count(),
            output_bytes_verified: checks.verified_bytes(),
            throttle: None,
        }))
    }
}

/// Why a live backup's run returned `Paused`: a planned stop ([`super::stop`]: its operator
/// stopped the lone survivor; nobody is left to tell) or a pause from outside.
fn paused_or_stopped(vm: &Vm) -> PairError {
    let exit = vm.stats().total();
    if vm.stop_requested() {
        PairError::Stopped(Stopped {
            exit,
            cause: StopCause::Requested,
            held: 0,
            told_peer: false,
        })
    } else {
        PairError::Paused(exit)
    }
}

/// How long go-live waits for the service TAP to become free.
const ATTACH_PATIENCE: Duration = Duration::from_secs(10);

/// Attaches `tap`, retrying while it is busy: after a partition the losing side may still
/// hold the TAP for a moment (it stops when it sees it lost the arbiter, and its TAP file
/// closes when it exits). Any other error, or still busy after [`ATTACH_PATIENCE`], fails.
fn attach_when_free(net: &NetHandle, tap: &str) -> Result<(), TapError> {
    let deadline = Instant::now() + ATTACH_PATIENCE;
    let mut logged = false;
    loop {
        match net.attach_tap(tap) {
            Err(TapError::SetIff(_, ref io))
                if io.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline =>
            {
                if !logged {
                    tracing::warn!(
                        tap,
                        "service TAP busy (the other side still holds it); retrying"
                    );
                    logged = true;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            r => return r,
        }
    }
}
