//! Re-protection: a new backup joins a primary that runs alone, by live state transfer, and
//! the pair goes on — so that it survives failure after failure (VMware's FT VMotion).
//!
//! A primary runs alone after its backup failed ([`super::golive`]: it won the next
//! generation, stopped logging, released what it held), and so does a backup that went live.
//! With a join point ([`JoinPoint`], given to the side's run beside its failover settings:
//! [`run_primary_ft`](crate::run::run_primary_ft), [`run_backup_ft`](crate::run::run_backup_ft))
//! and a [`JoinAcceptor`] listening, a new backup process (`ftvm backup --join HOST:PORT`, no
//! guest image of its own) connects and is cloned from the running VM: memory (and, in
//! own-copy mode, the disk) pre-copied while the guest runs, then a short stop-and-copy at an
//! exit boundary ([`ftvm_vmm_core::transfer`]); from that exit on the primary records again
//! and the new backup replays.
//!
//! # The join, step by step (one TCP connection, then the logging channel over it)
//! ```text
//!  joiner                                        primary (alone, generation g)
//!  JOIN {node, heartbeat addr}      ─────────>   alone? else REFUSE(NotAlone)
//!                                                arbiter: g held by us? win g+1 (else REFUSE)
//!                                                detector for the new pair (new UDP port)
//!                                   <─────────   ACCEPT {g+1, pairing digest, log capacity,
//!                                                        primary's heartbeat addr, timeout}
//!  Sink: header builds the VM       <─────────   CHUNK × n   pre-copy rounds, guest running
//!                                                converged ─> kick the vCPU: it stops between
//!                                                two exits (exit E) and, on its own thread:
//!                                                capture, last dirty pages into memory,
//!                                                log position C = next record, outputs gated
//!                                                again, log HEADER as record C, resume  ← pause
//!                                   <─────────   CHUNK × m (last pages, FINAL state),
//!                                                CUT {C, E, shared disk id}
//!  apply FINAL: VM at exit E; shared disk: the image named is the primary's
//!  READY                            ─────────>
//!  log receiver expects record C    <═════════>  log sender reconnected over this connection
//!  replay from exit E                            (or a link of its own: shm, xdp),
//!                                                generation g+1: records ≥ C, acks, outputs
//! ```
//!
//! # The primary's state machine
//! ```text
//!   Alone(g) ──JOIN──> Won(g+1) ──pre-copy──> Cut ──READY + handshake──> Paired(g+1)
//!      ▲                  │ joiner gone            │ joiner gone / handshake refused
//!      │                  ▼                        ▼
//!      └──────── Alone(g), nothing changed    monitor: backup gone ─> take_over(g+2) ─> Alone(g+2)
//! ```
//! Before the cut a failed join changes nothing but the arbiter (generation `g+1` is held by
//! this primary, which goes on alone in `g`; a retry wins `g+2`). After the cut the primary
//! is paired as far as its outputs are concerned: the new monitor (`PrimaryFt::rejoin`)
//! waits for the outcome of the handshake and, if the new backup never came up, goes alone by
//! the usual path (wins the next generation, releases every output held since the cut).
//!
//! # Why nothing is lost, and no stale backup can pair or go live
//! - **Output rule.** Before the cut the primary is alone: its outputs flow as they do now.
//!   At the cut, on the vCPU thread and before the guest runs again, the output gate stops
//!   releasing without acknowledgement and the net device's transmits are gated again; every
//!   output after the cut is tagged with a log position `≥ C`, which only the new backup can
//!   acknowledge (it holds the state at exit `E` and every record from `C` on). So an output
//!   reaches the world only once the new backup could reproduce it — the invariant of
//!   [`super::golive`] holds again from the cut.
//! - **The cut is exact.** The vCPU is between two exits, no device writes memory outside an
//!   exit, so the memory read after the final harvest and the captured state are one
//!   consistent cut ([`ftvm_vmm_core::transfer`]); the new backup's next exit has index `E`, and the
//!   primary's first record after the cut is the log header at position `C`, which the
//!   receiver expects first (`Config::start_seq`: the primary's older, unacknowledged records
//!   are released, never sent).
//! - **Generations.** The join wins `g+1` on the arbiter before the transfer; the logging
//!   channel of the new pair runs in `g+1` (frames and HELLOs of other generations are
//!   refused), and a backup of an older generation that tries to go live contests a
//!   generation this primary already holds, and loses. The new backup starts in `g+1`, so when
//!   this primary fails it takes over `g+2`.
//! - **The old link is closed** when the join is accepted: a backup presumed failed may still
//!   be alive (stopped, partitioned) with its connection open, and must neither receive a
//!   record of the new pair nor acknowledge one.
//! - **Who touches the log.** The ring keeps one owner at each end: the cut, on the vCPU
//!   thread, logs the new pair's header through the run's
//!   [`LogAppender`](super::primary::LogAppender) and lends it to the VM's recorder again; the
//!   join's thread only closes and re-pairs the link, through the writer's
//!   [`SenderHandle`](ftvm_channel::SenderHandle) (the poller thread, not the producer).
//! - **Failure midway.** The joiner killed or the link cut before the cut: the source stops
//!   dirty tracking, the guest was never paused, nothing changes. After the cut: the monitor
//!   goes alone (above). A retry is a new join.
//!
//! # A backup that went live accepts joins too
//! With a join point, a backup that goes live leaves its replay run at the next exit (a kick)
//! and runs as a lone primary ([`crate::run`], `live_as_primary`): a log writer in alone
//! mode over a sender with no backup yet (`LogSender::detached`), the output gate of a primary
//! for its console and transmits (releasing at once while alone), the same run loop as a
//! primary. A join then proceeds exactly as above; the pair's log starts at record 1.
//!
//! # Auto-converge
//! A guest that dirties pages faster than the link sends them never converges by itself:
//! every round re-sends its working set. After each such round the join lowers the vCPU's CPU
//! share (`Lever`: by the fraction of the dirty set that would fit in the final pause,
//! bounded to ×0.25…×0.7 per round, down to [`JoinOptions::min_share`]) through the primary's
//! throttle ([`ShareCap`](crate::share::ShareCap): its cgroup quota), so that the next
//! round dirties less; the progress lines carry the share. Before the cut the full share is
//! given back (and waited for: the cut's copy runs on the vCPU thread). Measured by
//! `reprotect.rs` (`auto_converge_...`): the `stream` guest rewriting 24 MiB over a 400 Mbit/s
//! link ran all 8 rounds and copied 6148 pages at the cut (pause 35–91 ms) without the lever;
//! with it pre-copy converged in 3 rounds at a share of 0.09–0.12, 406–775 pages at the cut
//! (pause 17 ms once the share is given back before the cut; 98 ms when it was not). A backup
//! that went live runs the same throttle once it is a primary ([`JoinPoint::with_throttle`],
//! started by `live_as_primary` in [`run`](crate::run)), so it has the lever too
//! (`reprotect.rs`, `a_backup_that_went_live_auto_converges_...`). Without a running throttle
//! (`--throttle-target-ms 0` on either role) there is no lever: pre-copy stops after
//! `max_rounds` and accepts the longer pause.
//!
//! # Failure midway, in time
//! Each side gives up on a peer that sends nothing, or does not take a message, for 20 s
//! (`PATIENCE`; a write's deadline covers the whole message): a link cut in the middle of the
//! transfer (no FIN, no RST) fails the join on the primary within that time, and the next
//! join can be served.
//!
//! # Transports
//! The join itself (JOIN … READY: the pre-copy stream, the cut) always runs over its TCP
//! connection; the new pair's logging channel then runs over that connection (`tcp`,
//! `tcp-spin`, `uring`: [`JoinLink::Tcp`], [`JoinLink::Uring`]) or over a link of its own
//! (`shm`, `xdp`: [`JoinLink::Own`]), opened per generation: the joiner creates its end before
//! READY, the primary attaches after it. Why not the pre-copy over shm/xdp too: it is a bulk,
//! flow-controlled stream of ~100 MB, which TCP carries at ~1–3 GB/s here; the shm and AF_XDP
//! transports are built for small latency-bound frames (a reliable-delivery layer over 4 KiB
//! frames for AF_XDP), and the pause, the figure that matters, does not depend on the pre-copy's
//! bandwidth once it converged.
//!
//! # Shared-disk mode
//! Nothing of the disk is copied; the joiner names the image itself (`--disk`). The CUT
//! carries the image's identity ([`SharedDiskId`]: its size and the generation its owner record
//! holds, the new pair's, taken by the primary at the cut), which the joiner checks on the
//! image it names before READY: a joiner given another image or a copy refuses to pair, and the
//! primary goes alone again (a failed join after the cut, above).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ftvm_channel::tcp::{TcpMode, TcpTransport};
use ftvm_channel::TransportError;
use serde::{Deserialize, Serialize};

use super::arbiter::ArbiterError;
use super::error::PairError;
use super::golive::{FtConfig, PrimaryFt};
use super::log::{Entry, LOG_VERSION};
use super::node::Role;
use super::output::OutputGate;
use super::primary::{Lent, LogWriter, PairOptions};
use super::throttle::{ThrottleConfig, ThrottleStatus};
use ftvm_vmm_core::transfer::{
    Chunk, Convergence, RoundStats, Sink, Source, SourceConfig, Step, TransferError, TransferHandle,
};
use ftvm_vmm_core::vm::{Vm, VmConfig, VmControl, VmError};

/// Version of the join messages (the framing and the JOIN/ACCEPT/CUT bodies).
/// Version 2: the CUT names the shared disk ([`CutInfo::shared_disk`]).
pub const JOIN_VERSION: u32 = 2;

/// Magic of every join message (distinct from the logging channel's `0xF7C1`).
const MAGIC: u16 = 0xF7D1;
/// Largest join message body (a chunk is at most a few hundred KiB; the final state ~5 KiB).
const MAX_BODY: usize = 64 << 20;
/// How long one side waits for the other's next message.
const PATIENCE: Duration = Duration::from_secs(20);

mod msg {
    pub const JOIN: u8 = 1;
    pub const ACCEPT: u8 = 2;
    pub const REFUSE: u8 = 3;
    pub const CHUNK: u8 = 4;
    pub const CUT: u8 = 5;
    pub const READY: u8 = 6;
}

/// Why a primary refused a join (the REFUSE message's code).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefuseReason {
    /// The primary has a backup (it is not alone), or another join is under way.
    NotAlone,
    /// The joiner speaks another [`JOIN_VERSION`].
    Version,
    /// The arbiter names another holder of this primary's generation: it was superseded.
    Superseded,
    /// The arbiter could not be asked, or the next generation could not be won.
    Arbiter,
}

/// Errors of a join, on either side.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// The connection failed.
    #[error("join connection: {op}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The peer sent something that is not the next join message.
    #[error("join protocol: {0}")]
    Protocol(&'static str),
    /// The primary refused the join.
    #[error("the primary refused the join ({reason:?}): {text}")]
    Refused {
        /// Why.
        reason: RefuseReason,
        /// Its explanation.
        text: String,
    },
    /// The state transfer failed.
    #[error("state transfer")]
    Transfer(#[from] TransferError),
    /// The arbiter failed.
    #[error("arbiter")]
    Arbiter(#[from] ArbiterError),
    /// The primary side failed (generation, detector, disk owner record).
    #[error("primary")]
    Pair(#[from] PairError),
    /// The VM could not be captured.
    #[error("VM")]
    Vm(#[from] VmError),
    /// The logging channel to the new backup could not be set up.
    #[error("logging channel")]
    Channel(#[from] TransportError),
    /// The vCPU did not reach the cut (the guest powered off, or the run ended).
    #[error("the vCPU did not stop for the cut within {0:?}")]
    NoCut(Duration),
    /// With [`JoinRequest::verify_cut`]: the new VM's memory differs from the primary's at the
    /// cut.
    #[error(
        "memory digest at the cut: the primary's is {primary:016x}, the joined VM's {joiner:016x}"
    )]
    Digest {
        /// The primary's.
        primary: u64,
        /// The joiner's.
        joiner: u64,
    },
    /// Shared-disk mode: the joiner's image is not the primary's ([`SharedDiskId::check`]).
    #[error("shared disk: {0}")]
    SharedDisk(String),
}

fn io(op: &'static str) -> impl FnOnce(std::io::Error) -> JoinError {
    move |source| JoinError::Io { op, source }
}

/// A join connection gives up on a peer that sends nothing for [`PATIENCE`] (a read), or
/// does not take a message within it ([`send`]): a link cut in the middle of the transfer
/// (packets dropped, no FIN, no RST) must fail the join on the primary's side, whose writes
/// would otherwise block until TCP gives up (`tcp_retries2`: about 15 minutes) — with the
/// join thread stuck, no retry could be served. The logging channel that runs over the
/// connection afterwards sets its own (non-blocking) mode.
fn patient(stream: &TcpStream) -> Result<(), JoinError> {
    stream.set_nodelay(true).map_err(io("configure"))?;
    stream
        .set_read_timeout(Some(PATIENCE))
        .map_err(io("configure"))
}

/// JOIN: what the joining backup says about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinRequest {
    /// [`JOIN_VERSION`].
    pub version: u32,
    /// The joiner's node id on the arbiter.
    pub node: String,
    /// The joiner's heartbeat address (the primary's detector sends there).
    pub heartbeat: SocketAddr,
    /// Ask the primary for its memory digest at the cut, and compare (costs the primary a
    /// digest of guest memory inside the pause: for tests and checks).
    pub verify_cut: bool,
}

/// ACCEPT: what the joiner needs to pair.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinAccept {
    /// [`JOIN_VERSION`].
    pub version: u32,
    /// The generation of the new pair (won by the primary for this join).
    pub generation: u64,
    /// The logging channel's pairing digest.
    pub digest: [u8; 32],
    /// The primary's log buffer capacity (the joiner's must accept its records).
    pub log_capacity: u64,
    /// The primary's heartbeat address for the new pair.
    pub heartbeat: SocketAddr,
    /// The failure timeout both sides use.
    pub fail_timeout_ms: u64,
    /// The primary's node id.
    pub node: String,
}

/// CUT: where the replay starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CutInfo {
    /// The first log record the new backup replays (the log header).
    pub seq: u64,
    /// The exit index of the cut.
    pub exit: u64,
    /// The primary's memory digest at the cut, when asked ([`JoinRequest::verify_cut`]).
    pub memory: Option<u64>,
    /// Shared-disk mode: the image the joiner must name ([`SharedDiskId`]).
    pub shared_disk: Option<SharedDiskId>,
}

/// What identifies a shared disk image to a joiner, sent with the CUT: its size, and the
/// generation its owner record (`<image>.owner`) holds — the new pair's, which the primary
/// took at the cut. The joiner checks both on the image it names (`--disk`) before READY and
/// refuses to pair when they differ: another image, a copy (its owner record is missing or
/// older) or a resized one would let the backup replay reads of other data than the primary's.
/// Why not a digest of the contents: the primary writes the image on after the cut, so no
/// content digest the joiner computes later can match one taken at the cut (only stalling the
/// guest's writes for a whole read of the image could), while the owner record changes only
/// when a side takes the disk over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedDiskId {
    /// The image's size in bytes.
    pub size: u64,
    /// The generation in its owner record.
    pub owner_generation: u64,
}

impl SharedDiskId {
    /// Checks that `image` is the disk this identifies.
    ///
    /// # Errors
    /// [`JoinError::SharedDisk`] naming what differs.
    pub fn check(&self, image: Option<&std::path::Path>) -> Result<(), JoinError> {
        let bad = |what: String| Err(JoinError::SharedDisk(what));
        let Some(image) = image else {
            return bad("the primary runs with a shared disk; name it with --disk".into());
        };
        let size = std::fs::metadata(image)
            .map_err(io("read the shared disk's size"))?
            .len();
        if size != self.size {
            return bad(format!(
                "{}: {size} bytes, the primary's image has {}",
                image.display(),
                self.size
            ));
        }
        let owner = ftvm_vmm_core::devices::virtio::owner::read_generation(image)
            .map_err(io("read the shared disk's owner record"))?;
        if owner != Some(self.owner_generation) {
            return bad(format!(
                "{}: its owner record holds generation {}, the primary's image generation {} \
                 (another image, or a copy)",
                image.display(),
                owner.map_or_else(|| "none".into(), |g| g.to_string()),
                self.owner_generation
            ));
        }
        Ok(())
    }
}

/// Writes one join message: `magic u16, type u8, 0 u8, len u32`, then the body.
fn send(w: &mut TcpStream, ty: u8, body: &[u8]) -> Result<(), JoinError> {
    let mut b = Vec::with_capacity(8 + body.len());
    b.extend_from_slice(&MAGIC.to_le_bytes());
    b.extend_from_slice(&[ty, 0]);
    b.extend_from_slice(&(body.len() as u32).to_le_bytes());
    b.extend_from_slice(body);
    // Within PATIENCE for the whole message, not per write(2) call: with the link cut, a
    // write still made progress now and then (the send buffer grows), so the socket's own
    // timeout, which restarts with each call, let a dead join linger for minutes.
    let deadline = Instant::now() + PATIENCE;
    let mut off = 0;
    while off < b.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io("send")(std::io::ErrorKind::TimedOut.into()));
        }
        w.set_write_timeout(Some(left)).map_err(io("configure"))?;
        match w.write(&b[off..]) {
            Ok(0) => return Err(io("send")(std::io::ErrorKind::WriteZero.into())),
            Ok(n) => off += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io("send")(e)),
        }
    }
    Ok(())
}

fn send_value<T: Serialize>(w: &mut TcpStream, ty: u8, v: &T) -> Result<(), JoinError> {
    let body = postcard::to_stdvec(v).map_err(|_| JoinError::Protocol("cannot encode"))?;
    send(w, ty, &body)
}

/// Reads one join message.
fn recv(r: &mut TcpStream) -> Result<(u8, Vec<u8>), JoinError> {
    let mut h = [0u8; 8];
    r.read_exact(&mut h).map_err(io("receive"))?;
    if u16::from_le_bytes([h[0], h[1]]) != MAGIC {
        return Err(JoinError::Protocol("not a join message (bad magic)"));
    }
    let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as usize;
    if len > MAX_BODY {
        return Err(JoinError::Protocol("join message too large"));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).map_err(io("receive"))?;
    Ok((h[2], body))
}

fn decode<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, JoinError> {
    postcard::from_bytes(body).map_err(|_| JoinError::Protocol("malformed message body"))
}

/// Reads the next message, which must be `want` (a REFUSE becomes [`JoinError::Refused`]).
fn expect(r: &mut TcpStream, want: u8) -> Result<Vec<u8>, JoinError> {
    let (ty, body) = recv(r)?;
    if ty == msg::REFUSE && want != msg::REFUSE {
        let (reason, text): (RefuseReason, String) = decode(&body)?;
        return Err(JoinError::Refused { reason, text });
    }
    if ty != want {
        return Err(JoinError::Protocol("unexpected message type"));
    }
    Ok(body)
}

fn refuse(w: &mut TcpStream, reason: RefuseReason, text: String) -> JoinError {
    let _ = send_value(w, msg::REFUSE, &(reason, text.clone()));
    JoinError::Refused { reason, text }
}

// ---------------------------------------------------------------------------------------------
// Primary side
// ---------------------------------------------------------------------------------------------

/// What the vCPU thread hands back from the cut.
struct CutDone {
    /// The last pages and the final state, encoded.
    chunks: Vec<Vec<u8>>,
    cut: CutInfo,
    pause: Duration,
    parts: PauseParts,
    source: Source,
    /// The primary's side of the pair that failed (dropped here, off the vCPU thread).
    _old: PrimaryFt,
}

/// A cut the join thread asks of the vCPU thread.
struct CutRequest {
    source: Source,
    next: PrimaryFt,
    armed: mpsc::Receiver<bool>,
    verify: bool,
    reply: mpsc::Sender<Result<CutDone, JoinError>>,
}

/// Where a join thread and the primary's vCPU thread meet for the cut: given to the primary's
/// run (its loop takes the cut between two exits) and to its [`JoinAcceptor`]. Cheap to
/// clone.
#[derive(Clone)]
pub struct JoinPoint {
    due: Arc<AtomicBool>,
    request: Arc<Mutex<Option<CutRequest>>>,
    /// The primary's log writer, once it runs as a primary (set by its run).
    writer: Arc<std::sync::OnceLock<LogWriter>>,
    /// The log buffer of a backup that goes live and becomes a primary.
    log_capacity: usize,
    /// The CPU throttle a backup that goes live runs as a primary (`None`: none).
    throttle: Option<ThrottleConfig>,
    /// Its final state, once its run ended.
    throttled: Arc<Mutex<Option<ThrottleStatus>>>,
}

impl std::fmt::Debug for JoinPoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinPoint")
            .field("due", &self.due.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl JoinPoint {
    /// A join point with nothing due; `log_capacity`: the log buffer a backup that goes live
    /// gives itself, to log for a backup that joins it (a power of two).
    pub fn new(log_capacity: usize) -> Self {
        JoinPoint {
            due: Arc::default(),
            request: Arc::default(),
            writer: Arc::default(),
            log_capacity,
            throttle: None,
            throttled: Arc::default(),
        }
    }

    /// The same, and a backup that goes live runs `throttle` on its vCPU once it is a primary
    /// (as `ftvm primary` does): the lag of the backups that join it is held to the target,
    /// and a join's auto-converge lever has a throttle to lower the share through (module
    /// docs, "Auto-converge"). `None`: no throttle (and no lever).
    pub fn with_throttle(mut self, throttle: Option<ThrottleConfig>) -> Self {
        self.throttle = throttle;
        self
    }

    /// The throttle a live backup runs as a primary.
    pub(crate) fn throttle(&self) -> Option<&ThrottleConfig> {
        self.throttle.as_ref()
    }

    /// The run of a live backup records its throttle's final state (whichever way it ended).
    pub(crate) fn record_throttle(&self, status: ThrottleStatus) {
        *self.throttled.lock().unwrap_or_else(|e| e.into_inner()) = Some(status);
    }

    /// The final state of the throttle a backup that went live ran as a primary
    /// ([`JoinPoint::with_throttle`]), once that run ended — on any path: power off, a planned
    /// stop, an error. `None` before, or when no throttle ran.
    pub fn throttle_status(&self) -> Option<ThrottleStatus> {
        *self.throttled.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The capacity of the log buffer a live backup gives itself.
    pub(crate) fn log_capacity(&self) -> usize {
        self.log_capacity
    }

    /// The run of a primary registers its writer: joins are served from then on.
    pub(crate) fn set_writer(&self, writer: &LogWriter) {
        let _ = self.writer.set(writer.clone());
    }

    /// Whether a join waits for the cut (checked by the primary's run loop when its vCPU was
    /// kicked).
    pub(crate) fn due(&self) -> bool {
        self.due.load(Ordering::Acquire)
    }

    fn post(&self, r: CutRequest) {
        *self.request.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
        self.due.store(true, Ordering::Release);
    }

    fn take(&self) -> Option<CutRequest> {
        self.due.store(false, Ordering::Release);
        self.request
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }
}

/// The cut a join asked for at `point`, on the vCPU thread, between two exits: captures the
/// state, reads the last dirty pages, makes `next` this primary's side of the pair (outputs
/// gated again, logging on, the log header as the first record of the new backup), and hands
/// the rest to the join thread. Returns whether the primary now logs; a failure before any
/// change leaves it alone.
///
/// # Errors
/// [`PairError`] only where the primary itself cannot go on (the shared disk's owner record
/// names a newer generation, the log cannot be written).
pub(crate) fn cut(
    point: &JoinPoint,
    ft: &mut PrimaryFt,
    vm: &mut Vm,
    (writer, log): (&LogWriter, &mut Lent),
    gate: &Arc<OutputGate>,
    opts: &PairOptions,
) -> Result<bool, PairError> {
    let Some(mut req) = point.take() else {
        return Ok(false);
    };
    let t0 = Instant::now();
    let (mut at, mut parts) = (t0, PauseParts::default());
    let last = (|| -> Result<(Vec<Vec<u8>>, u64), JoinError> {
        let state = vm.capture()?;
        let exit = state.exit_index();
        parts.capture = lap(&mut at);
        req.source.stop_and_copy(state)?;
        parts.harvest = lap(&mut at);
        let mut chunks = Vec::new();
        loop {
            match req.source.next_step()? {
                Step::Chunk(c) => chunks.push(c.encode()?),
                Step::Done => break,
                Step::Pause => return Err(JoinError::Protocol("pause after the cut")),
            }
        }
        parts.copy = lap(&mut at);
        Ok((chunks, exit))
    })();
    let (chunks, exit) = match last {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(error = %e, "join: the cut failed; the primary goes on alone");
            let _ = req.reply.send(Err(e));
            return Ok(false);
        }
    };
    let memory = req.verify.then(|| vm.memory_digest());
    let seq = log.get(vm)?.next_seq();
    let CutRequest {
        source,
        next,
        armed,
        reply,
        ..
    } = req;
    // The memory digest of `verify_cut`, if any, is none of the parts.
    lap(&mut at);
    let old = ft.rejoin(
        next,
        (Arc::clone(gate), writer, &*vm),
        opts.on_backup_stop,
        armed,
    )?;
    parts.rejoin = lap(&mut at);
    let header = log.get(vm)?.append(&Entry::Header {
        version: LOG_VERSION,
        digest_interval: opts.digest_interval,
        mem_digest_every: opts.mem_digest_every,
    })?;
    // The appender goes back to the VM's recorder: every input is logged again.
    log.lend(vm);
    debug_assert_eq!(
        header, seq,
        "the log header is the first record after the cut"
    );
    parts.header = lap(&mut at);
    let pause = t0.elapsed();
    // After the rejoin, which took the shared disk's owner record for the new generation.
    let shared_disk = vm.shared_disk().map(|d| SharedDiskId {
        size: d.size_bytes(),
        owner_generation: ft.config().generation,
    });
    tracing::info!(exit, seq, ?pause, ?parts, "join: cut");
    let _ = reply.send(Ok(CutDone {
        chunks,
        cut: CutInfo {
            seq,
            exit,
            memory,
            shared_disk,
        },
        pause,
        parts,
        source,
        _old: old,
    }));
    Ok(true)
}

/// The time since `*since`, which moves on to now: one part of the pause after another.
fn lap(since: &mut Instant) -> Duration {
    let now = Instant::now();
    now - std::mem::replace(since, now)
}

/// A logging link of its own (shared-memory rings, an AF_XDP socket): not the join's TCP
/// connection. Each side opens its end for the new pair once the transfer is over: the joiner
/// *before* it sends READY (it creates what the primary attaches to, as a backup does at its
/// start), the primary right after READY.
pub trait OwnLink: Send + Sync + std::fmt::Debug {
    /// This side's end of the link for the pair of `generation` (a per-generation name, so
    /// that what a failed backup left behind is never attached to).
    ///
    /// # Errors
    /// The transport's setup error.
    fn open(&self, generation: u64) -> Result<Box<dyn ftvm_channel::Transport>, TransportError>;
}

/// The transport the logging channel of a joined pair uses, on both sides: over the join's
/// TCP connection, or a link of its own.
#[derive(Debug, Clone)]
pub enum JoinLink {
    /// `tcp` (blocking) or `tcp-spin`.
    Tcp(TcpMode),
    /// `uring`: io_uring over the same connection.
    Uring,
    /// `shm`, `xdp`: a link of its own; the join's connection closes after READY.
    Own(Arc<dyn OwnLink>),
}

impl JoinLink {
    /// The transport of the pair of `generation`, over `stream` or its own.
    ///
    /// # Errors
    /// The transport's setup error.
    pub fn transport(
        &self,
        stream: &TcpStream,
        generation: u64,
    ) -> Result<Box<dyn ftvm_channel::Transport>, TransportError> {
        let stream = || {
            stream.try_clone().map_err(|source| TransportError::Io {
                op: "clone the join connection",
                source,
            })
        };
        Ok(match self {
            JoinLink::Tcp(mode) => Box::new(TcpTransport::from_stream(stream()?, *mode)?),
            JoinLink::Uring => Box::new(ftvm_channel::uring::UringTransport::from_stream(
                stream()?,
                ftvm_channel::uring::UringConfig::default(),
            )?),
            JoinLink::Own(link) => link.open(generation)?,
        })
    }
}

/// How a primary accepts joins.
#[derive(Debug, Clone)]
pub struct JoinOptions {
    /// When pre-copy stops.
    pub convergence: Convergence,
    /// Copy the disk image (own-copy mode); `false` in shared-disk mode.
    pub copy_disk: bool,
    /// The logging channel's parameters (digest, timers); the generation and settings are
    /// replaced for each join.
    pub channel: ftvm_channel::Config,
    /// The primary's log buffer capacity.
    pub log_capacity: u64,
    /// How the logging channel runs over the join connection afterwards.
    pub link: JoinLink,
    /// Lower the vCPU's CPU share while pre-copy does not converge (auto-converge, see the
    /// module docs); needs the primary's throttle running.
    pub auto_converge: bool,
    /// The lowest share auto-converge sets.
    pub min_share: f64,
}

impl JoinOptions {
    /// Defaults for `channel` (pre-copy until the rest fits in 5 ms at 1 GB/s, at most 30
    /// rounds, auto-converge down to a share of 0.05; the disk copied; blocking TCP).
    pub fn new(channel: ftvm_channel::Config, log_capacity: u64) -> Self {
        JoinOptions {
            convergence: Convergence::for_link(1e9, Duration::from_millis(5), 30),
            copy_disk: true,
            channel,
            log_capacity,
            link: JoinLink::Tcp(TcpMode::Blocking),
            auto_converge: true,
            min_share: 0.05,
        }
    }
}

/// What a join reports as it goes (on the join thread: keep handlers short).
#[derive(Debug, Clone)]
pub enum JoinEvent {
    /// A joiner connected and was accepted for this generation.
    Accepted {
        /// The joiner's node id.
        node: String,
        /// Its address.
        from: SocketAddr,
        /// The new pair's generation.
        generation: u64,
    },
    /// A pre-copy round ended.
    Round {
        /// Its figures.
        stats: RoundStats,
        /// Payload bytes sent so far.
        sent: u64,
        /// The pause the rest would cost at the bandwidth measured so far.
        estimated_pause: Duration,
        /// The vCPU's CPU share for the next round (auto-converge; 1 = not throttled).
        share: f64,
    },
    /// The join completed: the new backup replays from the cut.
    Done(JoinSummary),
    /// The join failed (the primary goes on as it was: alone before the cut, or its monitor
    /// goes alone after it).
    Failed {
        /// Why.
        error: String,
        /// Whether the cut had happened.
        after_cut: bool,
    },
}

/// What a completed join cost.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct JoinSummary {
    /// The new pair's generation.
    pub generation: u64,
    /// Pre-copy rounds (without the stop-and-copy).
    pub rounds: u32,
    /// Payload bytes sent (pages, disk, final state).
    pub bytes: u64,
    /// How long the guest was paused.
    pub pause: Duration,
    /// Where the pause went.
    pub parts: PauseParts,
    /// From the JOIN to the paired logging channel.
    pub duration: Duration,
    /// Pages sent in the stop-and-copy.
    pub final_pages: u64,
    /// The cut.
    pub cut_exit: u64,
    /// The first record the new backup replays.
    pub cut_seq: u64,
    /// The lowest CPU share auto-converge gave the vCPU (1: none needed, or no lever).
    pub min_share: f64,
}

/// Where a join's pause went, measured on the vCPU thread (the rest of
/// [`JoinSummary::pause`] is the memory digest of [`JoinRequest::verify_cut`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct PauseParts {
    /// Capturing the vCPU and device state ([`Vm::capture`]).
    pub capture: Duration,
    /// The last dirty-page harvest ([`Source::stop_and_copy`]).
    pub harvest: Duration,
    /// Copying the last pages and blocks out of guest memory, and ending dirty tracking.
    pub copy: Duration,
    /// Gating outputs again and starting the new pair's monitor (`PrimaryFt::rejoin`).
    pub rejoin: Duration,
    /// Appending the new pair's log header (waits while the log buffer is full).
    pub header: Duration,
}

/// Handler of [`JoinEvent`]s.
pub type JoinEvents = Box<dyn Fn(&JoinEvent) + Send + Sync>;

/// The listening side of a primary: accepts joins, one at a time, while the primary runs
/// alone. Stopped (and its thread joined) on drop.
pub struct JoinAcceptor {
    stop: Arc<AtomicBool>,
    addr: SocketAddr,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for JoinAcceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinAcceptor")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// What the join thread works with.
struct Primary {
    ft: FtConfig,
    point: JoinPoint,
    handle: TransferHandle,
    control: VmControl,
    opts: JoinOptions,
    events: JoinEvents,
}

impl JoinAcceptor {
    /// Starts accepting joins on `listener` for the VM `handle` and `control` belong to, with
    /// `ft` (its failover settings: the arbiter, its node id, its detector's settings) and
    /// `point`, the join point its run loop checks (the one given to its run:
    /// `run_primary_ft`, `run_backup_ft`). Joins are refused until the VM runs as a primary
    /// (the run registers its log writer with the join point: `ftvm primary` at once, a backup
    /// once it went live).
    ///
    /// # Errors
    /// The I/O error if the listener cannot be made non-blocking or the thread not started.
    pub fn spawn(
        listener: TcpListener,
        (ft, point): (FtConfig, JoinPoint),
        (handle, control): (TransferHandle, VmControl),
        opts: JoinOptions,
        events: JoinEvents,
    ) -> std::io::Result<Self> {
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let p = Primary {
            ft,
            point,
            handle,
            control,
            opts,
            events,
        };
        let s = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("ft-join".into())
            .spawn(move || {
                while !s.load(Ordering::Acquire) {
                    match listener.accept() {
                        Ok((stream, from)) => p.serve(stream, from),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "join: accept failed");
                            std::thread::sleep(Duration::from_millis(100));
                        }
                    }
                }
            })?;
        Ok(JoinAcceptor {
            stop,
            addr,
            thread: Some(thread),
        })
    }

    /// The address joins are accepted on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for JoinAcceptor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Primary {
    fn serve(&self, mut stream: TcpStream, from: SocketAddr) {
        let mut after_cut = false;
        if let Err(e) = self.join(&mut stream, from, &mut after_cut) {
            let error = ftvm_vmm_core::error_chain(&e);
            tracing::warn!(%error, after_cut, "join failed");
            (self.events)(&JoinEvent::Failed { error, after_cut });
        }
    }

    fn join(
        &self,
        stream: &mut TcpStream,
        from: SocketAddr,
        after_cut: &mut bool,
    ) -> Result<(), JoinError> {
        let t0 = Instant::now();
        stream.set_nonblocking(false).map_err(io("configure"))?;
        patient(stream)?;
        let req: JoinRequest = decode(&expect(stream, msg::JOIN)?)?;
        if req.version != JOIN_VERSION {
            return Err(refuse(
                stream,
                RefuseReason::Version,
                format!(
                    "join version {}; this primary speaks {JOIN_VERSION}",
                    req.version
                ),
            ));
        }
        let Some(writer) = self.point.writer.get() else {
            return Err(refuse(
                stream,
                RefuseReason::NotAlone,
                "this node does not run as a primary (yet)".into(),
            ));
        };
        if !writer.is_alone() {
            return Err(refuse(
                stream,
                RefuseReason::NotAlone,
                "this primary has a backup (it does not run alone)".into(),
            ));
        }
        // The next generation: this primary must hold the newest one.
        let (g, holder) = match self.ft.arbiter.current() {
            Ok(Some(c)) => c,
            Ok(None) => (0, self.ft.node.clone()),
            Err(e) => return Err(refuse(stream, RefuseReason::Arbiter, e.to_string())),
        };
        if holder != self.ft.node {
            return Err(refuse(
                stream,
                RefuseReason::Superseded,
                format!("generation {g} is held by {holder}, not by this primary"),
            ));
        }
        let mut cfg = self.ft.clone();
        cfg.generation = g + 1;
        cfg.detector.bind = SocketAddr::new(self.ft.detector.bind.ip(), 0);
        cfg.detector.peer = req.heartbeat;
        cfg.detector.role = Role::Primary;
        let next = match PrimaryFt::new(cfg) {
            Ok(n) => n,
            Err(e) => {
                let reason = match e {
                    PairError::Superseded { .. } => RefuseReason::Superseded,
                    _ => RefuseReason::Arbiter,
                };
                return Err(refuse(stream, reason, ftvm_vmm_core::error_chain(&e)));
            }
        };
        let generation = g + 1;
        // The link to the backup that failed is closed now if it was still open (a backup
        // presumed failed may live on, stopped or partitioned): nothing this primary logs
        // from the cut on may reach it, and no acknowledgement of it may release an output.
        let _ = writer
            .sender()
            .reconnect(Box::new(ftvm_channel::transport::Closed));
        send_value(
            stream,
            msg::ACCEPT,
            &JoinAccept {
                version: JOIN_VERSION,
                generation,
                digest: self.opts.channel.digest,
                log_capacity: self.opts.log_capacity,
                heartbeat: next.heartbeat_addr(),
                fail_timeout_ms: self.ft.detector.timeout.as_millis() as u64,
                node: self.ft.node.to_string(),
            },
        )?;
        (self.events)(&JoinEvent::Accepted {
            node: req.node.clone(),
            from,
            generation,
        });
        // Pre-copy while the guest runs.
        let mut source = Source::new(
            self.handle.clone(),
            SourceConfig {
                convergence: self.opts.convergence,
                copy_disk: self.opts.copy_disk,
                ..SourceConfig::default()
            },
        );
        let (mut sent, mut rounds_seen) = (0u64, 0usize);
        let started = Instant::now();
        let mut lever = Lever::new(writer, &self.opts);
        let fit = self.opts.convergence.max_final_bytes;
        loop {
            let step = source.next_step()?;
            let rounds = source.rounds();
            if rounds.len() > rounds_seen {
                rounds_seen = rounds.len();
                let stats = rounds[rounds_seen - 1];
                // The round that converged needs no lever: the cut comes next.
                let share = if matches!(step, Step::Pause) {
                    lever.share
                } else {
                    lever.after_round(stats.dirty_after * ftvm_vmm_core::dirty::PAGE_SIZE, fit)
                };
                (self.events)(&JoinEvent::Round {
                    stats,
                    sent,
                    estimated_pause: estimate_pause(&stats, sent, started.elapsed()),
                    share,
                });
            }
            match step {
                Step::Chunk(c) => {
                    sent += c.payload_len() as u64;
                    send(stream, msg::CHUNK, &c.encode()?)?;
                }
                Step::Pause => break,
                Step::Done => return Err(JoinError::Protocol("transfer done before the cut")),
            }
        }
        // Full speed for the cut (the guest dirties at most a few ms' worth more).
        lever.release();
        // The cut, on the vCPU thread.
        let (armed_tx, armed) = mpsc::channel();
        let (reply, done) = mpsc::channel();
        let point = &self.point;
        point.post(CutRequest {
            source,
            next,
            armed,
            verify: req.verify_cut,
            reply,
        });
        self.control.kick();
        let wait = Duration::from_secs(10);
        let done = match done.recv_timeout(wait) {
            Ok(r) => r?,
            Err(_) => {
                // Not taken: the run ended (or the guest powered off) before the cut.
                drop(point.take());
                return Err(JoinError::NoCut(wait));
            }
        };
        *after_cut = true;
        let cut_bytes: u64 = done.chunks.iter().map(|c| c.len() as u64).sum();
        for c in &done.chunks {
            send(stream, msg::CHUNK, c)?;
        }
        send_value(stream, msg::CUT, &done.cut)?;
        let paired = (|| -> Result<(), JoinError> {
            expect(stream, msg::READY)?;
            let t = self.opts.link.transport(stream, generation)?;
            let cfg = ftvm_channel::Config {
                generation,
                settings: Vec::new(),
                check_settings: None,
                ..self.opts.channel.clone()
            };
            writer.sender().reconnect_with(t, cfg)?;
            Ok(())
        })();
        let _ = armed_tx.send(paired.is_ok());
        paired?;
        let rounds = done.source.rounds();
        let final_pages = rounds.last().map_or(0, |r| r.pages);
        let summary = JoinSummary {
            generation,
            rounds: rounds.iter().filter(|r| !r.final_round).count() as u32,
            bytes: sent + cut_bytes,
            pause: done.pause,
            parts: done.parts,
            duration: t0.elapsed(),
            final_pages,
            cut_exit: done.cut.exit,
            cut_seq: done.cut.seq,
            min_share: lever.lowest,
        };
        (self.events)(&JoinEvent::Done(summary));
        Ok(())
    }
}

/// Auto-converge: the vCPU's CPU share as the lever of a pre-copy that does not converge by
/// itself (the guest dirties pages faster than the link sends them).
///
/// After each round whose dirty pages do not fit in the final pause
/// ([`Convergence::max_final_bytes`]), the share is multiplied by the fraction that would fit,
/// bounded to `[0.25, 0.7]` (at least a 30 % cut per round, at most a 4× one: the dirty set
/// is not proportional to the share — a working set smaller than a round's writes stays dirty
/// whatever the share — so the cut is steady rather than computed), down to
/// [`JoinOptions::min_share`]. The dirty rate of a CPU-bound guest follows its CPU time, so a
/// few rounds bring the rest under the bound; QEMU's auto-converge does the same with fixed
/// steps (20 %, then +10 % per round). The share is applied by the primary's throttle
/// ([`ShareCap`](crate::share::ShareCap): its cgroup quota, which also bounds a guest
/// running long between exits); without a running throttle there is no lever, and pre-copy
/// ends at [`Convergence::max_rounds`] with the longer pause, as before. The bound is lifted
/// before the cut (the cut's copy runs on the vCPU thread, which must not wait for its
/// quota), or when the join fails (on drop).
struct Lever {
    cap: Option<crate::share::ShareCap>,
    share: f64,
    min_share: f64,
    lowest: f64,
}

impl Lever {
    fn new(writer: &LogWriter, opts: &JoinOptions) -> Self {
        let cap = writer.share_cap();
        if opts.auto_converge && !cap.obeyed() {
            tracing::info!("join: no CPU throttle runs: pre-copy cannot auto-converge");
        }
        Lever {
            cap: (opts.auto_converge && cap.obeyed()).then(|| cap.clone()),
            share: 1.0,
            min_share: opts.min_share.clamp(1e-3, 1.0),
            lowest: 1.0,
        }
    }

    /// After a live round that left `left` bytes dirty: lowers the share if they do not fit
    /// in `fit` bytes; returns the share for the next round.
    fn after_round(&mut self, left: u64, fit: u64) -> f64 {
        if let Some(cap) = &self.cap {
            if left > fit {
                let ratio = fit as f64 / left.max(1) as f64;
                self.share = (self.share * ratio.clamp(0.25, 0.7)).max(self.min_share);
                self.lowest = self.lowest.min(self.share);
                cap.set(self.share);
            }
        }
        self.share
    }

    /// Gives the vCPU its full share back, and waits (briefly) until the throttle applied
    /// it: the cut's work runs on the vCPU thread, and under a quota of a few percent the
    /// copy of the last pages was descheduled for whole CFS periods (a 98 ms pause for 775
    /// pages at a share of 0.09, against 35 ms for 6148 pages without the lever).
    fn release(&mut self) {
        if let Some(cap) = &self.cap {
            if self.share < 1.0 && !cap.lift(Duration::from_millis(50)) {
                tracing::warn!("join: the throttle did not give the vCPU its full share back");
            }
        }
        self.share = 1.0;
    }
}

impl Drop for Lever {
    fn drop(&mut self) {
        self.release();
    }
}

/// The pause the pages left dirty after `r` would cost at the bandwidth measured so far.
fn estimate_pause(r: &RoundStats, sent: u64, elapsed: Duration) -> Duration {
    let bw = sent as f64 / elapsed.as_secs_f64().max(1e-6);
    Duration::from_secs_f64((r.dirty_after * ftvm_vmm_core::dirty::PAGE_SIZE) as f64 / bw.max(1.0))
}

// ---------------------------------------------------------------------------------------------
// Joining side
// ---------------------------------------------------------------------------------------------

/// What the joining side received: its VM at the cut, and how to pair.
pub struct Joined {
    /// The VM, at exit [`CutInfo::exit`].
    pub vm: Vm,
    /// The primary's answer.
    pub accept: JoinAccept,
    /// Where the replay starts.
    pub cut: CutInfo,
    /// The logging channel's transport, READY sent (over the join's connection, or a link of
    /// its own): the receiver starts over it with `ftvm_channel::Config::start_seq` =
    /// [`CutInfo::seq`].
    pub transport: Box<dyn ftvm_channel::Transport>,
    /// Pages and disk bytes received.
    pub received: (u64, u64),
    /// From connecting to READY.
    pub elapsed: Duration,
}

impl std::fmt::Debug for Joined {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Joined")
            .field("vm", &self.vm)
            .field("accept", &self.accept)
            .field("cut", &self.cut)
            .field("received", &self.received)
            .field("elapsed", &self.elapsed)
            .finish_non_exhaustive()
    }
}

/// What the joining side reports as it receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// Pages so far.
    pub pages: u64,
    /// Disk bytes so far.
    pub disk_bytes: u64,
}

/// Joins the primary at `primary`: sends `req`, builds the VM from the transfer with
/// `backends` (disk path, console; its net device has no backend while it replays), opens the
/// logging channel's `link` and sends READY once the VM holds the state at the cut. `progress` is called about every 16 MiB.
///
/// # Errors
/// [`JoinError`]: refused, connection lost (nothing is left behind but the disk image being
/// filled), a damaged transfer, a digest mismatch at the cut.
pub fn join(
    primary: SocketAddr,
    req: &JoinRequest,
    (backends, link): (&VmConfig, &JoinLink),
    mut progress: impl FnMut(Received),
) -> Result<Joined, JoinError> {
    let t0 = Instant::now();
    let mut stream =
        TcpStream::connect_timeout(&primary, PATIENCE).map_err(io("connect to the primary"))?;
    patient(&stream)?;
    send_value(&mut stream, msg::JOIN, req)?;
    let accept: JoinAccept = decode(&expect(&mut stream, msg::ACCEPT)?)?;
    if accept.version != JOIN_VERSION {
        return Err(JoinError::Protocol(
            "the primary speaks another join version",
        ));
    }
    let mut sink = Sink::new(backends);
    let mut next_report = 16u64 << 20;
    let cut = loop {
        let (ty, body) = recv(&mut stream)?;
        match ty {
            msg::CHUNK => sink.apply(Chunk::decode(&body)?)?,
            msg::CUT => break decode::<CutInfo>(&body)?,
            msg::REFUSE => {
                let (reason, text): (RefuseReason, String) = decode(&body)?;
                return Err(JoinError::Refused { reason, text });
            }
            _ => {
                return Err(JoinError::Protocol(
                    "unexpected message during the transfer",
                ))
            }
        }
        let (pages, disk_bytes) = sink.received();
        if pages * ftvm_vmm_core::dirty::PAGE_SIZE + disk_bytes >= next_report {
            next_report += 16 << 20;
            progress(Received { pages, disk_bytes });
        }
    };
    let received = sink.received();
    let vm = sink.finish()?;
    if let Some(primary) = cut.memory {
        let joiner = vm.memory_digest();
        if joiner != primary {
            return Err(JoinError::Digest { primary, joiner });
        }
    }
    if let Some(d) = &cut.shared_disk {
        d.check(backends.disk.as_deref())?;
    }
    // A link of its own is opened (created) before READY: the primary attaches to it next.
    let own = match link {
        JoinLink::Own(l) => Some(l.open(accept.generation)?),
        _ => None,
    };
    send(&mut stream, msg::READY, &[])?;
    stream.set_read_timeout(None).map_err(io("configure"))?;
    stream.set_write_timeout(None).map_err(io("configure"))?;
    let transport = match own {
        Some(t) => t,
        None => link.transport(&stream, accept.generation)?,
    };
    Ok(Joined {
        vm,
        accept,
        cut,
        transport,
        received,
        elapsed: t0.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_garbage_is_refused() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut b, _) = l.accept().unwrap();
        let req = JoinRequest {
            version: JOIN_VERSION,
            node: "c".into(),
            heartbeat: "127.0.0.1:9".parse().unwrap(),
            verify_cut: true,
        };
        send_value(&mut a, msg::JOIN, &req).unwrap();
        let got: JoinRequest = decode(&expect(&mut b, msg::JOIN).unwrap()).unwrap();
        assert_eq!(got, req);
        let e = refuse(&mut b, RefuseReason::NotAlone, "busy".into());
        assert!(matches!(
            e,
            JoinError::Refused {
                reason: RefuseReason::NotAlone,
                ..
            }
        ));
        match expect(&mut a, msg::ACCEPT) {
            Err(JoinError::Refused { reason, text }) => {
                assert_eq!((reason, text.as_str()), (RefuseReason::NotAlone, "busy"));
            }
            other => panic!("{other:?}"),
        }
        // A logging-channel frame (another magic) is not a join message.
        a.write_all(&[0xC1, 0xF7, 1, 0, 0, 0, 0, 0]).unwrap();
        assert!(matches!(recv(&mut b), Err(JoinError::Protocol(_))));
    }
}
