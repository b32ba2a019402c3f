//! The CPU share a primary's vCPU thread is held to, as the vCPU side sees it: the [`Pacer`]
//! its [`LogWriter`](crate::primary::LogWriter) consults at each logged exit, and the
//! [`ShareCap`] that bounds the share from outside the throttle (the join's auto-converge
//! lever). The controller that sets them is [`throttle`](crate::throttle), which sits above the
//! writer; these two sit below it, so that the writer needs nothing else of the throttle.
//!
//! A [`Pacer`] closes a hole the cgroup quota leaves: the quota is enforced by the scheduler
//! per 10 ms period, but on these nested-KVM machines a vCPU thread was seen running at ~0.7 of
//! a CPU for 50 ms under a quota of ~0.26 — and every such burst became a lag spike. At each
//! logged exit (the writer calls [`Pacer::pace`] on the vCPU thread) it keeps a token bucket of
//! CPU time — it earns `share × wall time`, spends the thread's CPU time
//! (`CLOCK_THREAD_CPUTIME_ID`) — and sleeps when the bucket is empty until the share has earned
//! back what was overspent. The bucket holds at most [`MAX_BURST`], so a thread that was idle
//! cannot run unchecked afterwards. At full share `pace` is two atomic loads.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Most CPU time the bucket holds (a burst at full speed after a quiet spell).
pub const MAX_BURST: Duration = Duration::from_millis(2);

/// The share, as `f64` bits; 1.0 = not throttled.
#[derive(Debug)]
pub struct Pacer {
    share_bits: AtomicU64,
    state: Mutex<Option<Bucket>>,
    /// `state` holds a bucket (cleared at the first `pace` at full share): lets `pace` at full
    /// share return without taking the lock.
    active: AtomicBool,
    /// Sleeps taken and their total (for the report and tests).
    sleeps: AtomicU64,
    slept_ns: AtomicU64,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    wall: Instant,
    cpu: Duration,
    /// CPU time the thread may still use, in seconds (negative: overspent).
    budget: f64,
}

impl Default for Pacer {
    fn default() -> Self {
        Pacer {
            share_bits: AtomicU64::new(1.0f64.to_bits()),
            state: Mutex::new(None),
            active: AtomicBool::new(false),
            sleeps: AtomicU64::new(0),
            slept_ns: AtomicU64::new(0),
        }
    }
}

/// A share as the actuators take it: clamped to `[0.001, 1]`, 1 when not finite.
pub(crate) fn clamp_share(share: f64) -> f64 {
    if share.is_finite() {
        share.clamp(1e-3, 1.0)
    } else {
        1.0
    }
}

/// CPU time of the calling thread.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call;
    // CLOCK_THREAD_CPUTIME_ID is always available on Linux.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if r != 0 {
        return Duration::ZERO;
    }
    Duration::new(
        ts.tv_sec.max(0) as u64,
        ts.tv_nsec.clamp(0, 999_999_999) as u32,
    )
}

impl Pacer {
    /// The share in force.
    pub fn share(&self) -> f64 {
        f64::from_bits(self.share_bits.load(Ordering::Relaxed))
    }

    /// Sets the share (clamped to `(0, 1]`).
    pub fn set_share(&self, share: f64) {
        self.share_bits
            .store(clamp_share(share).to_bits(), Ordering::Relaxed);
    }

    /// Sleeps taken so far and their total length.
    pub fn slept(&self) -> (u64, Duration) {
        (
            self.sleeps.load(Ordering::Relaxed),
            Duration::from_nanos(self.slept_ns.load(Ordering::Relaxed)),
        )
    }

    /// On the paced thread: accounts its CPU time since the last call and sleeps if it used
    /// more than its share. Cheap at full share.
    pub fn pace(&self) {
        let share = self.share();
        if share >= 1.0 && !self.active.load(Ordering::Relaxed) {
            return;
        }
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if share >= 1.0 {
            *state = None;
            self.active.store(false, Ordering::Relaxed);
            return;
        }
        self.active.store(true, Ordering::Relaxed);
        let (now, cpu) = (Instant::now(), thread_cpu());
        let b = state.get_or_insert(Bucket {
            wall: now,
            cpu,
            budget: 0.0,
        });
        let earned = share * now.duration_since(b.wall).as_secs_f64();
        let spent = cpu.saturating_sub(b.cpu).as_secs_f64();
        b.budget = (b.budget + earned - spent).min(MAX_BURST.as_secs_f64());
        b.wall = now;
        b.cpu = cpu;
        if b.budget >= 0.0 {
            return;
        }
        // Earn back the overdraft at `share` of wall time.
        let pause = Duration::from_secs_f64((-b.budget / share).min(0.1));
        drop(state);
        std::thread::sleep(pause);
        self.sleeps.fetch_add(1, Ordering::Relaxed);
        self.slept_ns
            .fetch_add(pause.as_nanos() as u64, Ordering::Relaxed);
    }
}

/// An upper bound on a throttle's share (`throttle::Throttle`), set from outside the controller: the join's
/// auto-converge lever ([`crate::join`]) lowers it while pre-copy does not converge and
/// gives it back after the cut. The controller applies `min(its own share, cap)` at each
/// update, with the same actuators (cgroup quota and pacer), so the lever needs no second
/// cgroup holding the vCPU thread (a thread is in one group of a hierarchy: a second group
/// would take it out of the throttle's). Cheap to clone; 1.0 = no bound.
#[derive(Debug, Clone)]
pub struct ShareCap {
    bits: Arc<AtomicU64>,
    /// The share the obeying throttle applied last.
    pub(crate) applied_bits: Arc<AtomicU64>,
    /// How many running throttles obey this cap.
    pub(crate) obeyed: Arc<AtomicU64>,
}

impl Default for ShareCap {
    fn default() -> Self {
        ShareCap {
            bits: Arc::new(AtomicU64::new(1.0f64.to_bits())),
            applied_bits: Arc::new(AtomicU64::new(1.0f64.to_bits())),
            obeyed: Arc::default(),
        }
    }
}

impl ShareCap {
    /// The bound now.
    pub fn get(&self) -> f64 {
        f64::from_bits(self.bits.load(Ordering::Relaxed))
    }

    /// Sets the bound (clamped to `[0.001, 1]`; not finite: 1).
    pub fn set(&self, share: f64) {
        self.bits
            .store(clamp_share(share).to_bits(), Ordering::Relaxed);
    }

    /// The share the throttle applied last (1 without a throttle).
    pub fn applied(&self) -> f64 {
        f64::from_bits(self.applied_bits.load(Ordering::Acquire))
    }

    /// Sets the bound to 1 and waits (at most `patience`) until the throttle applied a full
    /// share again — within a millisecond: a change of the bound is applied at the next
    /// sample, not at the next update. Returns whether it did.
    pub fn lift(&self, patience: Duration) -> bool {
        self.set(1.0);
        let deadline = Instant::now() + patience;
        while self.obeyed() && self.applied() < 1.0 {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        true
    }

    /// Whether a running throttle applies this bound (else setting it changes nothing).
    pub fn obeyed(&self) -> bool {
        self.obeyed.load(Ordering::Acquire) > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A busy thread paced at 25 % for 0.4 s uses about a quarter of the wall time: not much
    /// more, and not much less than it could have had (a pacer that sleeps too long fails).
    #[test]
    fn busy_thread_is_held_to_its_share() {
        // Bounds a time or a CPU share: one at a time with the other such tests.
        let _one = ftvm_testkit::one_at_a_time();
        let p = Pacer::default();
        p.set_share(0.25);
        let tid = crate::throttle::current_tid();
        let wait0 = ftvm_testkit::thread_schedstat(tid).expect("schedstat");
        let start = Instant::now();
        let cpu0 = thread_cpu();
        while start.elapsed() < Duration::from_millis(400) {
            // ~50 µs of work between "exits".
            let t = Instant::now();
            while t.elapsed() < Duration::from_micros(50) {
                std::hint::spin_loop();
            }
            p.pace();
        }
        let used = thread_cpu().saturating_sub(cpu0).as_secs_f64();
        let wall = start.elapsed().as_secs_f64();
        let ratio = used / wall;
        let (sleeps, _) = p.slept();
        assert!(sleeps > 10, "never slept");
        assert!(ratio < 0.45, "used {ratio:.2} of a CPU at share 0.25");
        // At least 60 % of the share, or of what the machine left it (time not spent waiting
        // on a run queue), whichever is less: the bound follows evidence of load only.
        let waited = (ftvm_testkit::thread_schedstat(tid)
            .expect("schedstat")
            .run_queue_wait
            - wait0.run_queue_wait)
            .as_secs_f64();
        let could = (1.0 - waited / wall).clamp(0.0, 1.0);
        assert!(
            ratio >= 0.6 * could.min(0.25),
            "used {ratio:.2} of a CPU at share 0.25 (it could have had {could:.2}): paced too hard"
        );
        // Full share: no sleeps added.
        p.set_share(1.0);
        let before = p.slept().0;
        for _ in 0..1000 {
            p.pace();
        }
        assert_eq!(p.slept().0, before);
    }
}
