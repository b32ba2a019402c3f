//! The error of a primary's or a backup's run ([`PairError`]) and the typed errors inside it
//! ([`LinkDown`], [`LogWriteError`], [`SetupError`]), in a module of their own: every part of
//! the pair (primary, backup, go-live, join, planned stops) returns them, so they sit below all
//! of them.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ftvm_channel::TransportError;
use ftvm_ringbuf::ClaimError;
use ftvm_vmm_core::vm::VmError;

pub use crate::link::LinkDown;

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
    /// The log could not be written, or its end was not acknowledged.
    #[error("log: {0}")]
    Log(LogWriteError),
    /// The log ended before the guest powered off (the primary is gone).
    #[error("log ended at exit {exit}: {why}")]
    LogEnded {
        /// The exit index.
        exit: u64,
        /// How the log was seen to end.
        why: LinkDown,
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
    #[error(transparent)]
    Setup(#[from] SetupError),
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
    Arbiter(#[source] Arc<crate::arbiter::ArbiterError>),
    /// The failure detector could not be started.
    #[error("failure detector")]
    Detector(#[from] crate::detector::DetectorError),
    /// The peer failed (its logging link broke) and this side has no arbiter to take over
    /// with: the pair stops ([`PeerFailurePolicy::Stop`](crate::primary::PeerFailurePolicy::Stop)).
    #[error(
        "the {peer} failed at exit {exit} ({why}); without an arbiter this side cannot take \
         over safely: the pair stops"
    )]
    PeerFailed {
        /// `"backup"` or `"primary"`.
        peer: &'static str,
        /// The exit index where this side stopped.
        exit: u64,
        /// How the failure showed.
        why: LinkDown,
    },
    /// Own-copy mode: a disk request of the backup gave another result than the primary's (its
    /// copy filled up, failed, or differs): this backup can no longer take over. It stopped
    /// without going live and told the primary (GOODBYE, `CannotTakeOver`).
    #[error("this backup can no longer take over: {0}")]
    CannotTakeOver(ftvm_vmm_core::devices::virtio::blk::CopyFailure),
    /// A planned stop ([`crate::stop`]): this side was asked to stop, or its peer left the
    /// pair as planned; no failover happened.
    #[error("{0}")]
    Stopped(crate::stop::Stopped),
    /// A role transition was refused ([`crate::role`]): the failover machinery met a case
    /// its state machine does not draw.
    #[error("failover role")]
    Role(#[from] crate::role::RoleError),
}

impl From<crate::arbiter::ArbiterError> for PairError {
    fn from(e: crate::arbiter::ArbiterError) -> Self {
        PairError::Arbiter(Arc::new(e))
    }
}

/// Why the primary could not write its log (or see its end acknowledged).
#[derive(Debug, Clone, thiserror::Error)]
pub enum LogWriteError {
    /// This primary was superseded: appends fail.
    #[error("this primary was superseded: it no longer logs")]
    Fenced,
    /// The run ended (or the pair stopped): appends fail.
    #[error("this primary's run has ended: it no longer logs")]
    Ended,
    /// An entry cannot be claimed in the log buffer (larger than the buffer allows).
    #[error("{0}")]
    Claim(ClaimError),
    /// The buffer is full and the link that would drain it is down (no arbiter decides).
    #[error("log buffer full and the link is down: {0}")]
    FullAndLinkDown(LinkDown),
    /// The backup did not acknowledge the End entry in time.
    #[error("the backup did not acknowledge the end of the log within {0:?}")]
    EndNotAcknowledged(Duration),
    /// Held outputs were still waiting for acknowledgements at the end.
    #[error("outputs still waiting at the end")]
    OutputsHeld,
}

/// A run could not be set up (or the parts it lent out are gone).
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// [`LogWriter::take_appender`](crate::primary::LogWriter::take_appender) while another run holds it.
    #[error("the log is being appended to by another run")]
    AppenderTaken,
    /// The VM's recorder is no longer the log's appender.
    #[error("the VM's recorder is no longer the log")]
    RecorderGone,
    /// The VM no longer replays the log.
    #[error("the VM no longer replays the log")]
    ReplayGone,
    /// The replay's log reader is gone.
    #[error("the replay's log reader is gone")]
    ReaderGone,
    /// A primary's VM replays a log (and it ran out at exit `exit`): it must run live.
    #[error("the primary's VM replays a log, which ran out at exit {exit}")]
    PrimaryReplays {
        /// Where the log ran out.
        exit: u64,
    },
    /// A thread could not be started.
    #[error("{what} thread")]
    Thread {
        /// Which thread.
        what: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A log buffer could not be created.
    #[error("log buffer")]
    LogBuffer(#[source] ftvm_ringbuf::RingError),
    /// The shared disk's owner record could not be taken.
    #[error("shared disk")]
    Disk(#[source] ftvm_vmm_core::devices::virtio::blk::BlkError),
    /// A backup went live but could not attach the service TAP.
    #[error("went live in generation {generation} but cannot attach TAP {tap}")]
    Tap {
        /// The generation won.
        generation: u64,
        /// The TAP's name.
        tap: String,
        /// The cause.
        #[source]
        source: ftvm_vmm_core::devices::virtio::net::TapError,
    },
    /// The throttle experiment's cgroup (test tooling).
    #[error("throttle")]
    Throttle(#[source] ThrottleError),
}

impl SetupError {
    /// A `what` thread could not be spawned.
    pub(crate) fn thread(what: &'static str) -> impl FnOnce(std::io::Error) -> Self {
        move |source| SetupError::Thread { what, source }
    }
}

/// Errors of the throttle.
#[derive(Debug, thiserror::Error)]
pub enum ThrottleError {
    /// No usable `cpu` controller (cgroup v1 or v2) for this process.
    #[error("no usable cgroup cpu controller: {why}")]
    NoCpuController {
        /// Why.
        why: String,
    },
    /// A cgroup or `/proc` file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The hierarchy could not be mounted in this process's private mount namespace.
    #[error("cannot mount the cgroup hierarchy at {target}")]
    Mount {
        /// The mount point.
        target: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The group's directory could not be created (not root? cgroupfs read-only?).
    #[error("cannot create the cgroup {path}")]
    CreateGroup {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A control file could not be written.
    #[error("cannot write {value:?} to {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// What was written.
        value: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A thread could not be moved into the group.
    #[error("cannot move thread {tid} into {path}")]
    MoveThread {
        /// The thread.
        tid: i32,
        /// The group.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The controller thread could not be started.
    #[error("cannot start the throttle thread")]
    Spawn(#[source] std::io::Error),
    /// A bad configuration value.
    #[error("bad throttle configuration: {0}")]
    Config(String),
}
