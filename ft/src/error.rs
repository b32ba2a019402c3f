//! The error of a primary's or a backup's run ([`PairError`]), in a module of its own: every
//! part of the pair (primary, backup, go-live, join, planned stops) returns it, so it sits
//! below all of them.

use ftvm_channel::TransportError;
use ftvm_vmm_core::vm::VmError;

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
    Arbiter(#[from] crate::arbiter::ArbiterError),
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
        /// How the failure showed (the link's error).
        why: String,
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
}
