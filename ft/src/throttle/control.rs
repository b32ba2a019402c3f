//! A throttle target agreed by both sides of the pair: a change goes through the log as a
//! control entry, so the primary and the backup apply it at the same exit index (the backup
//! keeps it for when it becomes the primary).
//!
//! ```text
//! propose_target(writer.controls(), 60 ms)        ─ push (key CONTROL_TARGET_US, 60_000)
//! primary, next checkpoint (exit N): log Control{N, key, value}, apply ─▶ TargetFollower ─▶ Throttle
//! backup, at exit N:                               apply                ─▶ TargetFollower (kept)
//! ```
//!
//! [`TargetFollower::install`] sets the queue's handler; a side that has other controls to
//! apply sets its own handler and calls [`TargetFollower::apply`] from it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::Inner;
use crate::log::{AppliedControl, ControlQueue};

/// Key of the control entry that sets the throttle target; the value is in microseconds.
pub const CONTROL_TARGET_US: u32 = 0x5448_0001;

/// A throttle target and the exit index at which it took effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgreedTarget {
    /// The exit index (the checkpoint where both sides applied it).
    pub exit: u64,
    /// The target.
    pub target: Duration,
}

/// Queues a new throttle target on the primary's control queue (`LogWriter::controls()`);
/// both sides apply it at the primary's next checkpoint.
pub fn propose_target(queue: &ControlQueue, target: Duration) {
    let us = target.as_micros().clamp(1, u64::MAX as u128) as u64;
    queue.push(CONTROL_TARGET_US, us);
}

/// Follows the throttle-target controls applied on one side: remembers the last one and, on
/// the primary, sets its [`Throttle`](super::Throttle)'s target.
#[derive(Debug, Clone, Default)]
pub struct TargetFollower {
    agreed: Arc<Mutex<Option<AgreedTarget>>>,
    throttle: Option<Arc<Inner>>,
}

impl TargetFollower {
    /// A follower that only records (the backup).
    pub fn new() -> Self {
        Self::default()
    }

    pub(super) fn for_throttle(inner: Arc<Inner>) -> Self {
        TargetFollower {
            agreed: Arc::clone(&inner.agreed),
            throttle: Some(inner),
        }
    }

    /// Applies `c` if it is a throttle-target control; returns whether it was.
    pub fn apply(&self, c: AppliedControl) -> bool {
        if c.key != CONTROL_TARGET_US {
            return false;
        }
        let target = Duration::from_micros(c.value.max(1));
        if let Some(t) = &self.throttle {
            t.set_target(target);
        }
        tracing::info!(
            target: "ftvm::throttle",
            exit = c.exit,
            target_ms = target.as_secs_f64() * 1e3,
            "throttle target agreed"
        );
        *self.agreed.lock().unwrap_or_else(|e| e.into_inner()) = Some(AgreedTarget {
            exit: c.exit,
            target,
        });
        true
    }

    /// Makes this follower the handler of `queue` (replacing any handler set before).
    pub fn install(&self, queue: &ControlQueue) {
        let me = self.clone();
        queue.on_apply(move |c| {
            me.apply(c);
        });
    }

    /// The last target applied, and where.
    pub fn agreed(&self) -> Option<AgreedTarget> {
        *self.agreed.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_only_target_controls() {
        let f = TargetFollower::new();
        assert!(!f.apply(AppliedControl {
            exit: 5,
            key: 7,
            value: 1
        }));
        assert_eq!(f.agreed(), None);
        assert!(f.apply(AppliedControl {
            exit: 9,
            key: CONTROL_TARGET_US,
            value: 60_000
        }));
        assert_eq!(
            f.agreed(),
            Some(AgreedTarget {
                exit: 9,
                target: Duration::from_millis(60)
            })
        );
        // Clones share the state (the handler holds one).
        assert_eq!(f.clone().agreed(), f.agreed());
    }

    #[test]
    fn proposals_are_queued_in_microseconds() {
        let q = ControlQueue::new();
        propose_target(&q, Duration::from_millis(75));
        propose_target(&q, Duration::ZERO);
        assert_eq!(q.pending(), 2);
    }
}
