//! `ftvm-ft`: fault tolerance for the VMs of `ftvm-vmm-core`, VMware FT style. The primary
//! records every nondeterministic input of its VM (through the VMM's [`record`] seams) into a
//! log that `ftvm-channel` ships to the backup, which replays it; outputs wait for the backup's
//! acknowledgement (the output rule); when one side fails, the other goes live after winning
//! the arbiter. Failure detection, split-brain protection and generation fencing:
//!
//! [`record`]: ftvm_vmm_core::record
//!
//! - [`error`]: the error of a primary's or backup's run ([`PairError`]).
//! - [`node`]: who a node is ([`NodeId`]) and which role it plays ([`Role`]).
//! - [`arbiter`]: the atomic test-and-set a node must win before it goes live, on a shared
//!   directory ([`FileArbiter`]) or etcd (`EtcdArbiter`, feature `etcd`).
//! - [`detector`]: presumes the peer failed after a timeout without heartbeats or traffic
//!   ([`Detector`]).
//! - [`fence`]: generation fencing of frames, heartbeats and outputs ([`Fence`]).
//! - [`primary`], [`backup`], [`log`] (the entry format: `LOG_FORMAT.md`), [`output`]:
//!   record/replay over the log channel with the output rule and divergence detection (the
//!   digests are the VMM's: `ftvm_vmm_core::digest`).
//! - [`golive`]: the backup going live and the primary continuing alone (the failover side of
//!   either role).
//! - [`join`]: a new backup joining a running primary (live state transfer, then logging).
//! - [`run`]: the runs of a side ([`run_primary`], [`run_primary_ft`], [`run_backup_ft`]) and
//!   the primary's run loop, which ties logging, the failover side and the join point together.
//! - [`role`]: the roles of the primary and the backup as two state machines (logging,
//!   watched, going alone, alone, fenced …; replaying, draining, deciding, live, superseded …),
//!   each transition one `step`, the typed [`transition::Transition`] it stands for emitted.
//! - [`stop`]: planned stops (SIGTERM): the peer is told (GOODBYE) and does not fail over.
//! - [`throttle`]: lag measurement and the CPU throttle that keeps the primary in step;
//!   [`share`]: the pacer and share cap its log writer obeys.
//! - [`observe`]: the live counters of a side (metrics endpoint, `ftvm stat`, reports).
//!
//! # Layers
//! Each module uses only modules of the layers below it, and none of its own layer that uses
//! it (`scripts/modcycles.py` checks that no two modules import each other, even through
//! others):
//! 1. the parts: [`node`], [`fence`], [`link`], [`log`], [`stop`], [`observe`], [`share`];
//!    [`arbiter`], [`detector`], [`transition`], [`output`] on those; [`role`] (the state
//!    machines) and [`error`] on top of them;
//! 2. record and replay: [`primary`] (the log writer, the recorder, the shared-disk barrier,
//!    the link watch of a primary without an arbiter), [`backup`] (the log reader, the replay
//!    loop); [`throttle`] on the primary's log writer;
//! 3. failover: [`golive`] (the primary's failover side and its monitor, the backup's go-live
//!    decision);
//! 4. re-protection: [`join`] (the join point, the cut, the acceptor, the joiner), on the
//!    primary's failover side it replaces at the cut;
//! 5. the runs: [`run`], whose loop calls into all of the above (a join's cut, going alone,
//!    the link watch) — which is why it sits on top rather than in [`primary`].
//!
//! The rule these pieces implement together: **never go live blind**. A node goes live (the
//! backup taking over, or the primary continuing alone) only after (1) the failure detector has
//! declared its peer failed and (2) it has won the next generation on the arbiter. While the
//! arbiter is unreachable it waits; it does not guess.
//!
//! ```
//! use ftvm_ft::{take_over, Acquire, Arbiter, Fence, FileArbiter, NodeId, RetryPolicy};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let shared = tempfile::tempdir()?; // in production: a directory on shared storage
//! let arbiter = FileArbiter::new(shared.path());
//! let (primary, backup) = (NodeId::new("host-a")?, NodeId::new("host-b")?);
//!
//! // The pair starts in generation 1, held by the primary.
//! assert_eq!(arbiter.try_acquire(1, &primary)?, Acquire::Won);
//! let fence = Fence::new(1);
//!
//! // The backup's detector presumed the primary failed: take over (waits while the
//! // directory is unreachable; `|| false`: never give up).
//! let (generation, outcome) = take_over(&arbiter, &fence, &backup, RetryPolicy::default(), || false)?;
//! assert_eq!((generation, outcome), (2, Acquire::Won));
//!
//! // Generation 2 is now the only one accepted: the old primary's frames are fenced off.
//! assert!(fence.allows(2) && !fence.allows(1));
//! # Ok(())
//! # }
//! ```

#![deny(missing_docs)]

pub mod arbiter;
pub mod backup;
pub mod detector;
pub mod error;
pub mod fence;
pub mod golive;
pub mod join;
pub mod link;
pub mod log;
pub mod node;
pub mod observe;
pub mod output;
pub mod primary;
pub mod role;
pub mod run;
pub mod share;
pub mod stop;
pub mod throttle;
pub mod transition;

pub use arbiter::{
    acquire_with_retry, take_over, Acquire, Arbiter, ArbiterError, FileArbiter, RetryPolicy,
};
pub use detector::{
    Detector, DetectorConfig, DetectorError, DetectorEvent, DetectorStats, PeerState, TrafficNote,
};
pub use error::PairError;
pub use fence::{Fence, FenceError};
pub use golive::{BackupFtReport, FtConfig, LiveReport};
pub use log::{AppliedControl, ControlQueue};
pub use node::{NodeId, NodeIdError, Role};
pub use run::{run_backup_ft, run_primary, run_primary_ft, PrimaryFtReport};
pub use transition::GoLiveTimings;
