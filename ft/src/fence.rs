//! Generation fencing: the check every frame, heartbeat and output goes through.
//!
//! Each successful test-and-set on the [arbiter](crate::arbiter) starts a new *generation*.
//! The node that won generation `g` is the only one allowed to act for the pair in `g`; anything
//! stamped with another generation comes from a node that has been superseded (a stale primary
//! that was partitioned away and does not know it yet) or from a newer one (in which case *this*
//! node is the stale one). [`Fence`] holds the generation this node currently acts in and answers
//! "may I accept / release something stamped `g`?" with `g == current`.
//!
//! The fence is a cheap clone (an `Arc` around two atomics) shared by the failure detector, the
//! channel handshake, and the output releaser. Generation `0` means "no generation won yet":
//! nothing is allowed until [`Fence::advance`] moves to generation 1 or later.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Why [`Fence::check`] refused a generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FenceError {
    /// The item comes from an older generation: its sender has been superseded; drop it.
    #[error("generation {got} is stale (current generation is {current})")]
    Stale {
        /// The generation the item carried.
        got: u64,
        /// This node's current generation.
        current: u64,
    },
    /// The item comes from a newer generation: this node has been superseded and must stop
    /// acting for the pair (never release outputs, never go live).
    #[error("generation {got} is newer than ours ({current}): this node is fenced off")]
    Superseded {
        /// The generation the item carried.
        got: u64,
        /// This node's current generation.
        current: u64,
    },
    /// No generation has been won yet (the fence is at generation 0).
    #[error("no generation has been won yet")]
    NoGeneration,
}

#[derive(Debug)]
struct FenceState {
    current: AtomicU64,
    rejected: AtomicU64,
}

/// The generation this node acts in, shared between threads.
#[derive(Debug, Clone)]
pub struct Fence {
    state: Arc<FenceState>,
}

impl Fence {
    /// A fence at `generation` (`0` for "none won yet").
    pub fn new(generation: u64) -> Self {
        Self {
            state: Arc::new(FenceState {
                current: AtomicU64::new(generation),
                rejected: AtomicU64::new(0),
            }),
        }
    }

    /// The current generation.
    pub fn current(&self) -> u64 {
        self.state.current.load(Ordering::Acquire)
    }

    /// Moves to `generation` if it is newer than the current one (generations never go back).
    /// Returns whether the fence moved. Call it after winning `generation` on the arbiter, or
    /// after learning through the arbiter that the pair moved on.
    pub fn advance(&self, generation: u64) -> bool {
        self.state.current.fetch_max(generation, Ordering::AcqRel) < generation
    }

    /// Whether an item stamped with `generation` is allowed (`generation == current != 0`).
    /// Refusals are counted (see [`Fence::rejected`]).
    pub fn allows(&self, generation: u64) -> bool {
        self.check(generation).is_ok()
    }

    /// Like [`Fence::allows`], saying why an item is refused.
    ///
    /// # Errors
    /// [`FenceError::Stale`] for an older generation, [`FenceError::Superseded`] for a newer one,
    /// [`FenceError::NoGeneration`] while the fence is at generation 0.
    pub fn check(&self, generation: u64) -> Result<(), FenceError> {
        let current = self.current();
        let verdict = if current == 0 {
            Err(FenceError::NoGeneration)
        } else if generation == current {
            Ok(())
        } else if generation < current {
            Err(FenceError::Stale {
                got: generation,
                current,
            })
        } else {
            Err(FenceError::Superseded {
                got: generation,
                current,
            })
        };
        if verdict.is_err() {
            self.state.rejected.fetch_add(1, Ordering::Relaxed);
        }
        verdict
    }

    /// How many items [`Fence::check`] / [`Fence::allows`] refused so far.
    pub fn rejected(&self) -> u64 {
        self.state.rejected.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_current_generation_passes() {
        let fence = Fence::new(0);
        assert_eq!(fence.check(0), Err(FenceError::NoGeneration));
        assert!(fence.advance(3));
        assert!(fence.allows(3));
        assert_eq!(
            fence.check(2),
            Err(FenceError::Stale { got: 2, current: 3 })
        );
        assert_eq!(
            fence.check(4),
            Err(FenceError::Superseded { got: 4, current: 3 })
        );
        assert_eq!(fence.rejected(), 3);
    }

    #[test]
    fn generations_never_go_back() {
        let fence = Fence::new(5);
        let clone = fence.clone();
        assert!(!clone.advance(4));
        assert!(!clone.advance(5));
        assert_eq!(fence.current(), 5);
        assert!(clone.advance(6));
        assert_eq!(fence.current(), 6);
        assert!(!fence.allows(5));
    }
}
