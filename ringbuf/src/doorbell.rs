//! [`Doorbell`]: lets one thread sleep until another has made something ready for it, without
//! a lost wake-up and without a syscall on the ringer's side while the sleeper is awake.
//!
//! It lives here, beside the idle strategies, so that the loom models of `tests/loom.rs` check
//! it with the same shim as the buffer's indices (the channel's pollers use it: the backup's log
//! consumer sleeps until the receiver delivers, the sender's poller until the producer commits).
//!
//! The protocol is Dekker's: the sleeper stores `sleeping`, then (SeqCst fence) checks `ready`;
//! the ringer makes its data ready, then (SeqCst fence) checks `sleeping`. With both fences in
//! one total order, at least one side sees the other's store: either the sleeper sees the data
//! and does not sleep, or the ringer sees the sleeper and unparks it. An unpark that comes
//! before the park leaves the park token set, so the park returns at once.

use std::time::Duration;

#[cfg(loom)]
use loom::{
    sync::atomic::{fence, AtomicBool, Ordering},
    sync::Mutex,
    thread::{self, Thread},
};
#[cfg(not(loom))]
use std::{
    sync::atomic::{fence, AtomicBool, Ordering},
    sync::Mutex,
    thread::{self, Thread},
};

/// One sleeper, any number of ringers.
#[derive(Debug, Default)]
pub struct Doorbell {
    sleeping: AtomicBool,
    sleeper: Mutex<Option<Thread>>,
}

impl Doorbell {
    /// A bell nobody sleeps on yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// After making something ready (stored before this call): wakes the sleeper, if asleep.
    /// Costs a fence and a load while nobody sleeps.
    pub fn ring(&self) {
        // Pairs with the fence in `sleep`: either the ringer sees the sleeper asleep, or the
        // sleeper's `ready()` sees what was made ready.
        fence(Ordering::SeqCst);
        if self.sleeping.load(Ordering::Relaxed) {
            // Unparked after the lock is released: the sleeper may be waiting for that lock
            // (at the start of its next sleep), and an unpark of a thread blocked on a lock
            // trips loom (tokio-rs/loom#249); for std it only leaves a token, as here.
            let t = self
                .sleeper
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            if let Some(t) = t {
                t.unpark();
            }
        }
    }

    /// On the sleeping thread: sleeps up to `timeout` unless `ready()`; returns whether it
    /// slept. (It may return early: on a ring, a spurious wake-up or a ring that came before it
    /// checked `ready`; callers re-check their condition.)
    pub fn sleep(&self, timeout: Duration, ready: impl FnOnce() -> bool) -> bool {
        *self.sleeper.lock().unwrap_or_else(|e| e.into_inner()) = Some(thread::current());
        self.sleeping.store(true, Ordering::Relaxed);
        // Pairs with the fence in `ring`.
        fence(Ordering::SeqCst);
        let slept = !ready();
        if slept {
            park(timeout);
        }
        self.sleeping.store(false, Ordering::Relaxed);
        slept
    }
}

#[cfg(not(loom))]
fn park(timeout: Duration) {
    thread::park_timeout(timeout);
}

/// Loom has no timed park: the model parks until unparked, so a lost wake-up is a deadlock
/// loom reports instead of a sleep that the timeout would end.
#[cfg(loom)]
fn park(_timeout: Duration) {
    thread::park();
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;
    use std::time::Instant;

    #[test]
    fn ring_wakes_a_sleeper_long_before_its_timeout() {
        let bell = Arc::new(Doorbell::new());
        let value = Arc::new(AtomicU64::new(0));
        let (b, v) = (Arc::clone(&bell), Arc::clone(&value));
        let sleeper = std::thread::spawn(move || {
            let t0 = Instant::now();
            while v.load(Ordering::Acquire) == 0 {
                bell_sleep(&b, &v);
            }
            t0.elapsed()
        });
        std::thread::sleep(Duration::from_millis(50));
        value.store(1, Ordering::Release);
        bell.ring();
        let waited = sleeper.join().expect("sleeper");
        assert!(waited < Duration::from_secs(5), "woke after {waited:?}");
    }

    fn bell_sleep(b: &Doorbell, v: &AtomicU64) {
        b.sleep(Duration::from_secs(10), || v.load(Ordering::Acquire) != 0);
    }

    #[test]
    fn ready_before_sleep_does_not_sleep() {
        let bell = Doorbell::new();
        assert!(!bell.sleep(Duration::from_secs(10), || true));
        assert!(bell.sleep(Duration::from_millis(1), || false));
    }
}
