//! Planned stops: a side of a pair that is asked to stop (its operator's SIGTERM, a
//! `systemctl stop`) leaves the pair on purpose, tells its peer (the channel's GOODBYE frame,
//! reason `PlannedStop`), and the peer does **not** fail over.
//!
//! ```text
//! primary asked to stop (VmControl::request_stop):
//!   vCPU out of guest code ─> no input is taken, no output produced any more
//!   ─> wait (≤ stop_timeout) until the backup acknowledged every entry logged
//!   ─> release every held output (they are all acknowledged now) ─> FT monitor off
//!   ─> GOODBYE(PlannedStop) ─> exit 207
//! backup told GOODBYE(PlannedStop):
//!   replay every entry received ─> the log ends ─> stop (207), never live
//!   (with PrimaryStopPolicy::TakeOver: go live at once — a handover — after winning the
//!    next generation, without waiting for the failure detector)
//! backup asked to stop:
//!   vCPU out of guest code (or out of its wait for the next entry) ─> GOODBYE(PlannedStop)
//!   ─> exit 207; it never goes live after that
//! primary told GOODBYE(PlannedStop):
//!   BackupStopPolicy::GoAlone (default): release what it held, stop logging, run on alone
//!     (with an arbiter after winning the next generation, as after a failure)
//!   BackupStopPolicy::Stop: stop too (207), as if asked
//! ```
//!
//! # Why no acknowledged output is lost, and why the peer must not fail over
//! The output rule holds outputs until the backup acknowledged the log position they were
//! produced at. A primary that simply exited would leave the held outputs unreleased — which
//! loses nothing any client was told about, but makes the backup's failure detector presume
//! the primary failed: with an arbiter the backup would take over, and a planned stop of the
//! pair would become a failover to a side that then runs alone. So the stopping primary first
//! stops its vCPU (after that no input is taken and no output produced), waits until the
//! backup has acknowledged every entry logged (bounded by `stop_timeout`: a backup that stays
//! silent meanwhile is the failure detector's business), releases every held output (each is
//! now acknowledged, so the release is the output rule's ordinary one), and only then says
//! GOODBYE. The GOODBYE travels on the logging channel after every entry (the channel
//! delivers in order), so the backup holds the whole log when it learns that the primary
//! stops; it replays it (its disk copy then holds every write the primary made) and stops.
//! The primary's heartbeats go on until after the GOODBYE, so the backup's detector cannot
//! presume a failure first. If the GOODBYE is lost (a transport that drops frames, a link cut
//! at that moment) the backup sees a failure and behaves as after one: the planned stop
//! degrades into a failover, never into a loss.
//!
//! A backup that stops says GOODBYE as soon as its vCPU left guest code: its outputs are
//! dropped anyway, and from the GOODBYE on it promises never to go live (it checks the stop
//! request before any go-live decision). That promise is what makes `GoAlone` safe for the
//! primary even without an arbiter: the only other copy has left and will not serve. With an
//! arbiter the primary still wins the next generation before it releases anything unheld,
//! which fences the stopped backup if it is restarted with its old generation.

use ftvm_channel::{Goodbye, GoodbyeReason};

/// What a primary does when its backup stops as planned (it said GOODBYE `PlannedStop`). A
/// backup that *fails* is [`PeerFailurePolicy`](super::primary::PeerFailurePolicy)'s business
/// (without an arbiter) or the arbiter's (with one).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum BackupStopPolicy {
    /// Go on alone, unprotected (the service stays up while the backup's host is serviced).
    /// Safe without an arbiter: the backup promised not to go live.
    #[default]
    GoAlone,
    /// Stop too: a planned stop of this primary ([`PairError::Stopped`](crate::error::PairError::Stopped), cause
    /// [`StopCause::PeerStopped`]).
    Stop,
}

/// What a backup does when its primary stops as planned (it said GOODBYE `PlannedStop`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PrimaryStopPolicy {
    /// Replay what was received and stop without going live.
    #[default]
    Stop,
    /// A handover: replay what was received, win the next generation and go live at once
    /// (needs an arbiter).
    TakeOver,
}

/// Why a side stopped as planned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopCause {
    /// This side was asked to ([`VmControl::request_stop`](ftvm_vmm_core::vm::VmControl::request_stop)).
    Requested,
    /// The peer left the pair as planned (its GOODBYE's explanation).
    PeerStopped(String),
}

/// How a planned stop went ([`PairError::Stopped`](crate::error::PairError::Stopped)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stopped {
    /// The exit index where the VM stopped.
    pub exit: u64,
    /// Why.
    pub cause: StopCause,
    /// Primary: outputs still held when it stopped (not acknowledged within the stop
    /// timeout; never released). Zero on a backup (its outputs are dropped).
    pub held: usize,
    /// Whether the peer was told (GOODBYE sent); false when it left first, or the link was
    /// down.
    pub told_peer: bool,
}

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.cause {
            StopCause::Requested => write!(f, "stopped as asked at exit {}", self.exit)?,
            StopCause::PeerStopped(why) => write!(
                f,
                "the peer stopped as planned ({why}); stopped at exit {}",
                self.exit
            )?,
        }
        if self.held > 0 {
            write!(
                f,
                "; {} output(s) never acknowledged, not released",
                self.held
            )?;
        }
        if self.told_peer {
            f.write_str("; the peer was told")?;
        }
        Ok(())
    }
}

/// Whether `g` is a planned stop's GOODBYE.
pub fn is_planned(g: &Goodbye) -> bool {
    g.reason == GoodbyeReason::PlannedStop
}
