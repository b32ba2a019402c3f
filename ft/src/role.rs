//! The roles of the two sides of a pair, as two state machines: a side is in exactly one state,
//! held in one [`RoleCell`] and changed only by [`Machine::step`], which refuses every
//! transition not drawn below ([`RoleError`]). Hot paths read the role without a lock (an
//! `AtomicU8` mirrors it); a transition takes the cell's lock, and the typed
//! [`Transition`] it stands for, if any, goes to the side's sink (the CLI prints it, reports
//! and tests collect it: [`super::transition`]).
//!
//! # The primary ([`PrimaryState`])
//! ```text
//!                 RunAlone (no arbiter: --go-alone-unprotected, a backup's planned stop;
//!      ┌──────────────────────────────┐   or a backup that went live runs as a lone primary)
//!      │                              ▼
//!   LOGGING ──Watch──▶ WATCHED ──BackupGone──▶ GOING ALONE ──Won──▶ ALONE ──Released──▶ ALONE
//!      │     (an FT     │    (presumed failed,  │ (take_over:         ▲  │  (held outputs    (timings)
//!      │     monitor    │     link down,        │  waits while the    │  │   released)
//!      │     and the    │     GOODBYE)          │  arbiter is         │  │
//!      │     arbiter    │ Lost                  │  unreachable)       │  └─Rejoined─▶ WATCHED
//!      │     decide)    ▼                       │ Lost / ArbiterFailed│     (a join's cut)
//!      │             FENCED ◀───────────────────┘                     │
//!      │ PeerFailed  (nothing more released, appends fail, the VM stops: exit 203)
//!      ▼
//!   PEER FAILED (no arbiter, --on-peer-failure stop: the pair stops, exit 204)
//!
//!   Stop: LOGGING, WATCHED, GOING ALONE, ALONE ──▶ STOPPED (the run ended: power off, a
//!         planned stop; the link going down is no failure from here on)
//! ```
//! What the roles mean for the vCPU's appends ([`LogAppender`](super::primary::LogAppender)):
//! LOGGING fails an append when the buffer is full and the link is down (nobody decides
//! anything else); WATCHED and GOING ALONE wait for log space while the link is down (the
//! monitor decides); ALONE drops appends (nothing is logged); FENCED, PEER FAILED and STOPPED
//! fail them. The shared disk's write barrier passes at once in ALONE and refuses in FENCED.
//!
//! # The backup ([`BackupState`])
//! ```text
//!   REPLAYING ──LogStopped──▶ DRAINING ──RanOut──▶ DECIDING ──Won──▶ LIVE (exit N, generation g+1)
//!      │ (link error, or the   │ (receiver severed:   │ (the detector presumes the primary
//!      │  detector: primary    │  every entry held    │  failed, or two fail timeouts since
//!      │  presumed failed)     │  is replayed)        │  the link broke; then take_over)
//!      │                       │                      ├──Lost──▶ SUPERSEDED (exit 203, never live)
//!      └──────RanOut───────────┼─────────────────────▶├──Stop──▶ STOPPED (a planned stop)
//!                              │                      └──Fail──▶ FAILED (arbiter, TAP, disk)
//!   REPLAYING, DRAINING ──Finish──▶ FINISHED (the End entry: the guest powered off)
//!   REPLAYING, DRAINING, DECIDING ──Stop──▶ STOPPED;  ──Fail──▶ FAILED (diverged, own disk copy
//!                                                        failed, log ended without an arbiter)
//! ```
//! The log runs out where the vCPU needs an entry it does not have; the vCPU then returns to
//! the backup's run loop with that exit pending ([`ftvm_vmm_core::vcpu`], "A replay that runs out
//! pauses the run"), and the loop — not the exit handler — steps DECIDING and decides
//! ([`super::golive`]).

use std::fmt;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use ftvm_channel::Goodbye;

use super::arbiter::ArbiterError;
use super::node::Role;
use super::stop::is_planned;
use super::transition::GoLiveTimings;
use super::transition::{Transition, TransitionSink};

/// A transition [`Machine::step`] refused: no arrow leaves `from` on that event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RoleError {
    /// The primary's machine.
    #[error("the primary cannot go from {from:?} on {event:?}")]
    Primary {
        /// The role it was in.
        from: PrimaryRole,
        /// The event refused.
        event: PrimaryEventKind,
    },
    /// The backup's machine.
    #[error("the backup cannot go from {from:?} on {event:?}")]
    Backup {
        /// The role it was in.
        from: BackupRole,
        /// The event refused.
        event: BackupEventKind,
    },
}

/// A side's state machine: its states (which may carry what the transition decided), its
/// events, and the one transition function.
pub trait Machine: Clone + fmt::Debug + Send + 'static {
    /// The state without its data (what hot paths read, `AtomicU8`-encoded).
    type Role: Copy + Eq + fmt::Debug;
    /// What can happen to the side.
    type Event: fmt::Debug;
    /// Every role; a role's index here is its code in the cell's `AtomicU8`.
    const ROLES: &'static [Self::Role];
    /// The role of this state.
    fn role(&self) -> Self::Role;
    /// The role's code in the cell's `AtomicU8` (its index in [`Machine::ROLES`]).
    fn code(role: Self::Role) -> u8 {
        let i = Self::ROLES.iter().position(|r| *r == role);
        debug_assert!(i.is_some(), "{role:?} is missing from ROLES");
        i.unwrap_or(0) as u8
    }
    /// The role of a code [`Machine::code`] gave.
    fn decode(code: u8) -> Self::Role {
        Self::ROLES[usize::from(code) % Self::ROLES.len()]
    }
    /// The state `event` leads to from this one.
    ///
    /// # Errors
    /// [`RoleError`] if no transition leaves this state on `event`.
    fn step(&self, event: Self::Event) -> Result<Self, RoleError>;
    /// The typed event that entering `next` from this state is, if any.
    fn transition(&self, next: &Self) -> Option<Transition>;
}

/// One side's role, shared by the threads that read or change it. Cheap to clone.
pub struct RoleCell<M: Machine> {
    inner: Arc<CellInner<M>>,
}

struct CellInner<M: Machine> {
    /// [`Machine::code`] of the state's role: read without the lock.
    role: AtomicU8,
    /// The state (with its data); changed only by [`RoleCell::step`].
    state: Mutex<M>,
    /// Where the transitions go ([`super::transition`]).
    sink: OnceLock<TransitionSink>,
}

impl<M: Machine> Clone for RoleCell<M> {
    fn clone(&self) -> Self {
        RoleCell {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<M: Machine> fmt::Debug for RoleCell<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("RoleCell").field(&self.state()).finish()
    }
}

impl<M: Machine> RoleCell<M> {
    /// A cell in state `initial`.
    pub fn new(initial: M) -> Self {
        RoleCell {
            inner: Arc::new(CellInner {
                role: AtomicU8::new(M::code(initial.role())),
                state: Mutex::new(initial),
                sink: OnceLock::new(),
            }),
        }
    }

    /// Sends the typed transitions to `sink` from now on (the first sink set stays).
    pub fn set_sink(&self, sink: Option<TransitionSink>) {
        if let Some(s) = sink {
            let _ = self.inner.sink.set(s);
        }
    }

    /// The current role (no lock: one atomic load).
    pub fn role(&self) -> M::Role {
        M::decode(self.inner.role.load(Ordering::Acquire))
    }

    /// Whether the side is in `role`.
    pub fn is(&self, role: M::Role) -> bool {
        self.role() == role
    }

    /// The current state, with its data.
    pub fn state(&self) -> M {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, M> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies `event`: the new state, or the refusal (the state is then unchanged). The
    /// transition's typed event goes to the sink (outside the lock).
    ///
    /// # Errors
    /// [`RoleError`] as [`Machine::step`].
    pub fn step(&self, event: M::Event) -> Result<M::Role, RoleError> {
        let (role, announce) = {
            let mut state = self.lock();
            let next = state.step(event)?;
            let announce = state.transition(&next);
            let role = next.role();
            *state = next;
            self.inner.role.store(M::code(role), Ordering::Release);
            (role, announce)
        };
        if let (Some(t), Some(sink)) = (announce, self.inner.sink.get()) {
            sink(&t);
        }
        Ok(role)
    }
}

// ---------------------------------------------------------------------------------------------
// Primary
// ---------------------------------------------------------------------------------------------

/// The primary's role (its state without data).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PrimaryRole {
    /// Logging; no arbiter decides what a dead link means.
    Logging,
    /// Logging; an FT monitor (failure detector and arbiter) decides what a dead link means.
    Watched,
    /// The backup is gone: winning the next generation before going alone.
    GoingAlone,
    /// Runs alone: nothing is logged, outputs flow.
    Alone,
    /// Lost the take-over (or the arbiter failed): releases nothing more, stops.
    Fenced,
    /// Without an arbiter the backup failed, and the pair stops.
    PeerFailed,
    /// The run ended.
    Stopped,
}

impl PrimaryRole {
    /// Every role ([`Machine::ROLES`]).
    pub const ALL: [PrimaryRole; 7] = [
        PrimaryRole::Logging,
        PrimaryRole::Watched,
        PrimaryRole::GoingAlone,
        PrimaryRole::Alone,
        PrimaryRole::Fenced,
        PrimaryRole::PeerFailed,
        PrimaryRole::Stopped,
    ];
}

/// Why a primary's backup is gone: what sends a watched primary to [`PrimaryRole::GoingAlone`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackupGone {
    /// The failure detector presumes it failed.
    Failed,
    /// The log link is down (it may live: the arbiter decides).
    LinkDown,
    /// It left the pair and said why (a GOODBYE; e.g. `CannotTakeOver`: its disk copy failed,
    /// so it could never take over: the primary goes on as if it had failed).
    Left(Goodbye),
}

/// Why a primary was fenced.
#[derive(Debug, Clone)]
pub enum Fenced {
    /// Another node holds a newer generation.
    Superseded {
        /// That generation.
        generation: u64,
        /// Its holder.
        winner: String,
    },
    /// The arbiter failed (other than by being unreachable, which is waited out).
    Arbiter(Arc<ArbiterError>),
}

/// The primary's state.
#[derive(Debug, Clone)]
pub enum PrimaryState {
    /// [`PrimaryRole::Logging`].
    Logging,
    /// [`PrimaryRole::Watched`].
    Watched,
    /// [`PrimaryRole::GoingAlone`], and why.
    GoingAlone(BackupGone),
    /// [`PrimaryRole::Alone`]; the timings of going alone once the held outputs were
    /// released after a won take-over (`None` before, and without a take-over).
    Alone(Option<GoLiveTimings>),
    /// [`PrimaryRole::Fenced`], and why.
    Fenced(Fenced),
    /// [`PrimaryRole::PeerFailed`], and how the link failed.
    PeerFailed(crate::link::LinkDown),
    /// [`PrimaryRole::Stopped`].
    Stopped,
}

/// What happens to a primary.
#[derive(Debug, Clone)]
pub enum PrimaryEvent {
    /// An FT monitor takes charge of the link (`run_primary_ft` starts).
    Watch,
    /// The monitor found the backup gone.
    BackupGone(BackupGone),
    /// The next generation was won: logging stops (the held outputs are released next).
    Won,
    /// Going alone without a test-and-set: no arbiter (the backup stopped as planned, or
    /// `--go-alone-unprotected`), or a backup that went live runs as a lone primary.
    RunAlone,
    /// The held outputs were released after a won take-over; the timings of going alone.
    Released(GoLiveTimings),
    /// Another node holds a newer generation (a lost test-and-set, a heartbeat's claim the
    /// arbiter confirmed, the shared disk's owner record).
    Lost {
        /// That generation.
        generation: u64,
        /// Its holder.
        winner: String,
    },
    /// The arbiter failed while going alone.
    ArbiterFailed(Arc<ArbiterError>),
    /// A new backup joined at a cut ([`super::join`]): logging again, watched.
    Rejoined,
    /// Without an arbiter, the link broke: the backup failed, the pair stops.
    PeerFailed(crate::link::LinkDown),
    /// The run ended.
    Stop,
}

/// [`PrimaryEvent`] without its data (for [`RoleError`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PrimaryEventKind {
    /// [`PrimaryEvent::Watch`].
    Watch,
    /// [`PrimaryEvent::BackupGone`].
    BackupGone,
    /// [`PrimaryEvent::Won`].
    Won,
    /// [`PrimaryEvent::RunAlone`].
    RunAlone,
    /// [`PrimaryEvent::Released`].
    Released,
    /// [`PrimaryEvent::Lost`].
    Lost,
    /// [`PrimaryEvent::ArbiterFailed`].
    ArbiterFailed,
    /// [`PrimaryEvent::Rejoined`].
    Rejoined,
    /// [`PrimaryEvent::PeerFailed`].
    PeerFailed,
    /// [`PrimaryEvent::Stop`].
    Stop,
}

impl PrimaryEvent {
    /// The event without its data.
    pub fn kind(&self) -> PrimaryEventKind {
        match self {
            PrimaryEvent::Watch => PrimaryEventKind::Watch,
            PrimaryEvent::BackupGone(_) => PrimaryEventKind::BackupGone,
            PrimaryEvent::Won => PrimaryEventKind::Won,
            PrimaryEvent::RunAlone => PrimaryEventKind::RunAlone,
            PrimaryEvent::Released(_) => PrimaryEventKind::Released,
            PrimaryEvent::Lost { .. } => PrimaryEventKind::Lost,
            PrimaryEvent::ArbiterFailed(_) => PrimaryEventKind::ArbiterFailed,
            PrimaryEvent::Rejoined => PrimaryEventKind::Rejoined,
            PrimaryEvent::PeerFailed(_) => PrimaryEventKind::PeerFailed,
            PrimaryEvent::Stop => PrimaryEventKind::Stop,
        }
    }
}

impl Machine for PrimaryState {
    type Role = PrimaryRole;
    type Event = PrimaryEvent;
    const ROLES: &'static [PrimaryRole] = &PrimaryRole::ALL;

    fn role(&self) -> PrimaryRole {
        match self {
            PrimaryState::Logging => PrimaryRole::Logging,
            PrimaryState::Watched => PrimaryRole::Watched,
            PrimaryState::GoingAlone(_) => PrimaryRole::GoingAlone,
            PrimaryState::Alone(_) => PrimaryRole::Alone,
            PrimaryState::Fenced(_) => PrimaryRole::Fenced,
            PrimaryState::PeerFailed(_) => PrimaryRole::PeerFailed,
            PrimaryState::Stopped => PrimaryRole::Stopped,
        }
    }

    fn step(&self, event: PrimaryEvent) -> Result<Self, RoleError> {
        use PrimaryEvent as E;
        use PrimaryState as S;
        let from = self.role();
        Ok(match (self, event) {
            (S::Logging, E::Watch) => S::Watched,
            (S::Logging, E::RunAlone) => S::Alone(None),
            (S::Logging, E::PeerFailed(why)) => S::PeerFailed(why),
            (S::Watched, E::BackupGone(gone)) => S::GoingAlone(gone),
            (S::GoingAlone(_), E::Won) => S::Alone(None),
            (S::Alone(_), E::Released(t)) => S::Alone(Some(t)),
            (S::Alone(_), E::Rejoined) => S::Watched,
            (S::Watched | S::GoingAlone(_), E::Lost { generation, winner }) => {
                S::Fenced(Fenced::Superseded { generation, winner })
            }
            (S::GoingAlone(_), E::ArbiterFailed(e)) => S::Fenced(Fenced::Arbiter(e)),
            (S::Logging | S::Watched | S::GoingAlone(_) | S::Alone(_), E::Stop) => S::Stopped,
            (_, event) => {
                return Err(RoleError::Primary {
                    from,
                    event: event.kind(),
                })
            }
        })
    }

    fn transition(&self, next: &Self) -> Option<Transition> {
        match next {
            PrimaryState::GoingAlone(BackupGone::Left(goodbye)) if !is_planned(goodbye) => {
                Some(Transition::BackupLeft {
                    goodbye: goodbye.clone(),
                })
            }
            PrimaryState::Alone(Some(t)) => Some(Transition::Alone(*t)),
            PrimaryState::Fenced(Fenced::Superseded { generation, winner }) => {
                Some(Transition::LostTakeOver {
                    role: Role::Primary,
                    generation: *generation,
                    winner: winner.clone(),
                })
            }
            _ => None,
        }
    }
}

/// The primary's role cell.
pub type PrimaryRoleCell = RoleCell<PrimaryState>;

// ---------------------------------------------------------------------------------------------
// Backup
// ---------------------------------------------------------------------------------------------

/// The backup's role (its state without data).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackupRole {
    /// Replaying the primary's log as it arrives.
    Replaying,
    /// The log stopped (the receiver is severed): replaying what it holds.
    Draining,
    /// The log ran out: waiting for the failure detector, then the arbiter.
    Deciding,
    /// Won the next generation: runs the guest live.
    Live,
    /// Another node holds a newer generation: never live.
    Superseded,
    /// A planned stop: never live.
    Stopped,
    /// Cannot go on (diverged, own disk copy failed, log ended without an arbiter, the
    /// arbiter or the go-live failed): never live.
    Failed,
    /// The End entry was replayed: the guest powered off on both sides.
    Finished,
}

impl BackupRole {
    /// Every role ([`Machine::ROLES`]).
    pub const ALL: [BackupRole; 8] = [
        BackupRole::Replaying,
        BackupRole::Draining,
        BackupRole::Deciding,
        BackupRole::Live,
        BackupRole::Superseded,
        BackupRole::Stopped,
        BackupRole::Failed,
        BackupRole::Finished,
    ];
}

/// The backup's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackupState {
    /// [`BackupRole::Replaying`].
    Replaying,
    /// [`BackupRole::Draining`].
    Draining,
    /// [`BackupRole::Deciding`], at this exit.
    Deciding {
        /// Where the log ran out.
        exit: u64,
    },
    /// [`BackupRole::Live`], with the timings of going live.
    Live(GoLiveTimings),
    /// [`BackupRole::Superseded`].
    Superseded {
        /// The newer generation.
        generation: u64,
        /// Its holder.
        winner: String,
    },
    /// [`BackupRole::Stopped`].
    Stopped,
    /// [`BackupRole::Failed`].
    Failed,
    /// [`BackupRole::Finished`].
    Finished,
}

/// What happens to a backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackupEvent {
    /// The log stopped: the link failed, or the primary is presumed failed and the receiver
    /// was severed (again while draining: no change).
    LogStopped,
    /// The log ran out at exit `exit`: the decision begins.
    RanOut {
        /// Where.
        exit: u64,
    },
    /// The next generation was won and the outputs are this side's: live.
    Won(GoLiveTimings),
    /// Another node holds a newer generation.
    Lost {
        /// That generation.
        generation: u64,
        /// Its holder.
        winner: String,
    },
    /// A planned stop of this side or of the primary.
    Stop,
    /// The replay or the decision failed.
    Fail,
    /// The End entry was replayed.
    Finish,
}

/// [`BackupEvent`] without its data (for [`RoleError`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackupEventKind {
    /// [`BackupEvent::LogStopped`].
    LogStopped,
    /// [`BackupEvent::RanOut`].
    RanOut,
    /// [`BackupEvent::Won`].
    Won,
    /// [`BackupEvent::Lost`].
    Lost,
    /// [`BackupEvent::Stop`].
    Stop,
    /// [`BackupEvent::Fail`].
    Fail,
    /// [`BackupEvent::Finish`].
    Finish,
}

impl BackupEvent {
    /// The event without its data.
    pub fn kind(&self) -> BackupEventKind {
        match self {
            BackupEvent::LogStopped => BackupEventKind::LogStopped,
            BackupEvent::RanOut { .. } => BackupEventKind::RanOut,
            BackupEvent::Won(_) => BackupEventKind::Won,
            BackupEvent::Lost { .. } => BackupEventKind::Lost,
            BackupEvent::Stop => BackupEventKind::Stop,
            BackupEvent::Fail => BackupEventKind::Fail,
            BackupEvent::Finish => BackupEventKind::Finish,
        }
    }
}

impl Machine for BackupState {
    type Role = BackupRole;
    type Event = BackupEvent;
    const ROLES: &'static [BackupRole] = &BackupRole::ALL;

    fn role(&self) -> BackupRole {
        match self {
            BackupState::Replaying => BackupRole::Replaying,
            BackupState::Draining => BackupRole::Draining,
            BackupState::Deciding { .. } => BackupRole::Deciding,
            BackupState::Live(_) => BackupRole::Live,
            BackupState::Superseded { .. } => BackupRole::Superseded,
            BackupState::Stopped => BackupRole::Stopped,
            BackupState::Failed => BackupRole::Failed,
            BackupState::Finished => BackupRole::Finished,
        }
    }

    fn step(&self, event: BackupEvent) -> Result<Self, RoleError> {
        use BackupEvent as E;
        use BackupState as S;
        let from = self.role();
        Ok(match (self, event) {
            (S::Replaying | S::Draining, E::LogStopped) => S::Draining,
            (S::Replaying | S::Draining, E::RanOut { exit }) => S::Deciding { exit },
            (S::Replaying | S::Draining, E::Finish) => S::Finished,
            (S::Deciding { .. }, E::Won(t)) => S::Live(t),
            (S::Deciding { .. }, E::Lost { generation, winner }) => {
                S::Superseded { generation, winner }
            }
            (S::Replaying | S::Draining | S::Deciding { .. }, E::Stop) => S::Stopped,
            (S::Replaying | S::Draining | S::Deciding { .. }, E::Fail) => S::Failed,
            (_, event) => {
                return Err(RoleError::Backup {
                    from,
                    event: event.kind(),
                })
            }
        })
    }

    fn transition(&self, next: &Self) -> Option<Transition> {
        match next {
            BackupState::Live(t) => Some(Transition::Live(*t)),
            BackupState::Superseded { generation, winner } => Some(Transition::LostTakeOver {
                role: Role::Backup,
                generation: *generation,
                winner: winner.clone(),
            }),
            _ => None,
        }
    }
}

/// The backup's role cell.
pub type BackupRoleCell = RoleCell<BackupState>;

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ftvm_channel::GoodbyeReason;

    use super::*;
    use crate::link::LinkDown;

    fn timings() -> GoLiveTimings {
        GoLiveTimings {
            generation: 2,
            at_exit: 7,
            total: Duration::from_millis(3),
            ..Default::default()
        }
    }

    /// One state of each primary role.
    fn primary_states() -> Vec<PrimaryState> {
        vec![
            PrimaryState::Logging,
            PrimaryState::Watched,
            PrimaryState::GoingAlone(BackupGone::Failed),
            PrimaryState::Alone(None),
            PrimaryState::Fenced(Fenced::Superseded {
                generation: 3,
                winner: "backup".into(),
            }),
            PrimaryState::PeerFailed(LinkDown::Down),
            PrimaryState::Stopped,
        ]
    }

    /// One event of each primary kind.
    fn primary_events() -> Vec<PrimaryEvent> {
        vec![
            PrimaryEvent::Watch,
            PrimaryEvent::BackupGone(BackupGone::LinkDown),
            PrimaryEvent::Won,
            PrimaryEvent::RunAlone,
            PrimaryEvent::Released(timings()),
            PrimaryEvent::Lost {
                generation: 3,
                winner: "backup".into(),
            },
            PrimaryEvent::ArbiterFailed(Arc::new(ArbiterError::Stopped)),
            PrimaryEvent::Rejoined,
            PrimaryEvent::PeerFailed(LinkDown::Down),
            PrimaryEvent::Stop,
        ]
    }

    /// The primary's diagram as a table: where each (role, event) leads, `None` if refused.
    fn primary_table(from: PrimaryRole, event: PrimaryEventKind) -> Option<PrimaryRole> {
        use PrimaryEventKind as E;
        use PrimaryRole as R;
        Some(match (from, event) {
            (R::Logging, E::Watch) => R::Watched,
            (R::Logging, E::RunAlone) => R::Alone,
            (R::Logging, E::PeerFailed) => R::PeerFailed,
            (R::Watched, E::BackupGone) => R::GoingAlone,
            (R::GoingAlone, E::Won) => R::Alone,
            (R::Alone, E::Released) => R::Alone,
            (R::Alone, E::Rejoined) => R::Watched,
            (R::Watched | R::GoingAlone, E::Lost) => R::Fenced,
            (R::GoingAlone, E::ArbiterFailed) => R::Fenced,
            (R::Logging | R::Watched | R::GoingAlone | R::Alone, E::Stop) => R::Stopped,
            _ => return None,
        })
    }

    /// Steps every sample state (one per role) with every sample event and compares with the
    /// diagram's `table` (the event's kind by `kind`, the refusal `refused` expects): every
    /// (role, event) pair is checked, and `drawn` transitions are allowed.
    fn check_every_pair<M, K>(
        (states, events): (&[M], &[M::Event]),
        kind: impl Fn(&M::Event) -> K,
        table: impl Fn(M::Role, K) -> Option<M::Role>,
        refused: impl Fn(M::Role, K) -> RoleError,
        drawn: usize,
    ) where
        M: Machine,
        M::Event: Clone,
        K: Copy + fmt::Debug,
    {
        assert_eq!(states.len(), M::ROLES.len(), "a role without a sample");
        let mut legal = 0;
        for s in states {
            for e in events {
                let (from, k) = (s.role(), kind(e));
                match (s.step(e.clone()), table(from, k)) {
                    (Ok(next), Some(want)) => {
                        assert_eq!(next.role(), want, "{from:?} on {k:?}");
                        legal += 1;
                    }
                    (Err(err), None) => assert_eq!(err, refused(from, k), "{from:?} on {k:?}"),
                    (r, want) => panic!("{from:?} on {k:?}: {r:?}, the diagram says {want:?}"),
                }
            }
        }
        assert_eq!(legal, drawn, "transitions drawn in the diagram");
    }

    #[test]
    fn every_primary_transition_is_the_diagrams_and_every_other_is_refused() {
        check_every_pair(
            (&primary_states(), &primary_events()),
            PrimaryEvent::kind,
            primary_table,
            |from, event| RoleError::Primary { from, event },
            14,
        );
    }

    fn backup_states() -> Vec<BackupState> {
        vec![
            BackupState::Replaying,
            BackupState::Draining,
            BackupState::Deciding { exit: 7 },
            BackupState::Live(timings()),
            BackupState::Superseded {
                generation: 3,
                winner: "primary".into(),
            },
            BackupState::Stopped,
            BackupState::Failed,
            BackupState::Finished,
        ]
    }

    fn backup_events() -> Vec<BackupEvent> {
        vec![
            BackupEvent::LogStopped,
            BackupEvent::RanOut { exit: 7 },
            BackupEvent::Won(timings()),
            BackupEvent::Lost {
                generation: 3,
                winner: "primary".into(),
            },
            BackupEvent::Stop,
            BackupEvent::Fail,
            BackupEvent::Finish,
        ]
    }

    fn backup_table(from: BackupRole, event: BackupEventKind) -> Option<BackupRole> {
        use BackupEventKind as E;
        use BackupRole as R;
        Some(match (from, event) {
            (R::Replaying | R::Draining, E::LogStopped) => R::Draining,
            (R::Replaying | R::Draining, E::RanOut) => R::Deciding,
            (R::Replaying | R::Draining, E::Finish) => R::Finished,
            (R::Deciding, E::Won) => R::Live,
            (R::Deciding, E::Lost) => R::Superseded,
            (R::Replaying | R::Draining | R::Deciding, E::Stop) => R::Stopped,
            (R::Replaying | R::Draining | R::Deciding, E::Fail) => R::Failed,
            _ => return None,
        })
    }

    #[test]
    fn every_backup_transition_is_the_diagrams_and_every_other_is_refused() {
        check_every_pair(
            (&backup_states(), &backup_events()),
            BackupEvent::kind,
            backup_table,
            |from, event| RoleError::Backup { from, event },
            14,
        );
    }

    #[test]
    fn role_codes_round_trip() {
        for r in PrimaryRole::ALL {
            assert_eq!(PrimaryState::decode(PrimaryState::code(r)), r);
        }
        for r in BackupRole::ALL {
            assert_eq!(BackupState::decode(BackupState::code(r)), r);
        }
    }

    /// The cell emits the typed transitions of the steps it takes, and a refused step changes
    /// nothing (and emits nothing).
    #[test]
    fn a_cell_emits_each_decisions_transition_and_keeps_its_state_on_a_refusal() {
        let got = Arc::new(Mutex::new(Vec::new()));
        let g = Arc::clone(&got);
        let cell = PrimaryRoleCell::new(PrimaryState::Logging);
        cell.set_sink(Some(Arc::new(move |t: &Transition| {
            g.lock().unwrap().push(t.clone())
        })));
        let left = Goodbye {
            reason: GoodbyeReason::CannotTakeOver,
            text: "its disk copy failed".into(),
        };
        assert_eq!(cell.step(PrimaryEvent::Watch), Ok(PrimaryRole::Watched));
        assert_eq!(
            cell.step(PrimaryEvent::BackupGone(BackupGone::Left(left.clone()))),
            Ok(PrimaryRole::GoingAlone)
        );
        assert_eq!(cell.step(PrimaryEvent::Won), Ok(PrimaryRole::Alone));
        assert!(cell.is(PrimaryRole::Alone));
        assert_eq!(
            cell.step(PrimaryEvent::Watch),
            Err(RoleError::Primary {
                from: PrimaryRole::Alone,
                event: PrimaryEventKind::Watch
            })
        );
        assert!(
            cell.is(PrimaryRole::Alone),
            "a refused step changed the role"
        );
        assert_eq!(
            cell.step(PrimaryEvent::Released(timings())),
            Ok(PrimaryRole::Alone)
        );
        assert!(matches!(cell.state(), PrimaryState::Alone(Some(t)) if t == timings()));
        assert_eq!(
            *got.lock().unwrap(),
            vec![
                Transition::BackupLeft { goodbye: left },
                Transition::Alone(timings())
            ]
        );
    }
}
