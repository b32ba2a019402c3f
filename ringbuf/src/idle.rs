//! Idle strategies for pollers and blocked producers (spin → yield → park, as Aeron does).
//!
//! A poller calls [`IdleStrategy::idle`] with the amount of work its last iteration did; work
//! resets the back-off. On these machines a parked thread takes ~55–70 µs to wake, so the hot
//! path spins and backs off only after being idle for a while.

use std::time::Duration;

/// What a thread does when it has nothing to do.
pub trait IdleStrategy: Send {
    /// Called after each iteration; `work == 0` means nothing was done.
    fn idle(&mut self, work: usize);
    /// Forget any back-off state.
    fn reset(&mut self);
}

/// Spin with a CPU pause hint; lowest latency, burns a core.
#[derive(Debug, Default, Clone, Copy)]
pub struct BusySpin;

impl IdleStrategy for BusySpin {
    #[inline]
    fn idle(&mut self, _work: usize) {
        std::hint::spin_loop();
    }
    fn reset(&mut self) {}
}

/// Spin `spins` times, then `yield_now` on every idle call.
#[derive(Debug, Clone, Copy)]
pub struct SpinThenYield {
    spins: u32,
    count: u32,
}

impl SpinThenYield {
    /// Spin `spins` idle iterations before yielding.
    pub fn new(spins: u32) -> Self {
        Self { spins, count: 0 }
    }
}

impl Default for SpinThenYield {
    fn default() -> Self {
        Self::new(10_000)
    }
}

impl IdleStrategy for SpinThenYield {
    #[inline]
    fn idle(&mut self, work: usize) {
        if work > 0 {
            self.count = 0;
            return;
        }
        if self.count < self.spins {
            self.count += 1;
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
    fn reset(&mut self) {
        self.count = 0;
    }
}

/// Spin, then yield, then park for exponentially growing periods up to `max_park`.
#[derive(Debug, Clone, Copy)]
pub struct BackoffPark {
    spins: u32,
    yields: u32,
    min_park: Duration,
    max_park: Duration,
    count: u32,
    park: Duration,
}

impl BackoffPark {
    /// A back-off with the given phases.
    pub fn new(spins: u32, yields: u32, min_park: Duration, max_park: Duration) -> Self {
        Self {
            spins,
            yields,
            min_park,
            max_park,
            count: 0,
            park: min_park,
        }
    }
}

impl Default for BackoffPark {
    fn default() -> Self {
        Self::new(
            10_000,
            100,
            Duration::from_micros(50),
            Duration::from_millis(1),
        )
    }
}

impl IdleStrategy for BackoffPark {
    fn idle(&mut self, work: usize) {
        if work > 0 {
            self.reset();
            return;
        }
        if self.count < self.spins {
            self.count += 1;
            std::hint::spin_loop();
        } else if self.count < self.spins + self.yields {
            self.count += 1;
            std::thread::yield_now();
        } else {
            std::thread::park_timeout(self.park);
            self.park = (self.park * 2).min(self.max_park);
        }
    }
    fn reset(&mut self) {
        self.count = 0;
        self.park = self.min_park;
    }
}

/// The strategies by name, for configuration files and flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IdleKind {
    /// [`BusySpin`].
    Spin,
    /// [`SpinThenYield`].
    #[default]
    Yield,
    /// [`BackoffPark`].
    Park,
}

impl IdleKind {
    /// A boxed strategy of this kind with default parameters.
    pub fn build(self) -> Box<dyn IdleStrategy> {
        match self {
            Self::Spin => Box::new(BusySpin),
            Self::Yield => Box::new(SpinThenYield::default()),
            Self::Park => Box::new(BackoffPark::default()),
        }
    }
}

impl std::str::FromStr for IdleKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "spin" => Ok(Self::Spin),
            "yield" => Ok(Self::Yield),
            "park" => Ok(Self::Park),
            other => Err(format!(
                "unknown idle strategy {other:?} (spin, yield, park)"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_parse_and_build() {
        assert_eq!("spin".parse::<IdleKind>(), Ok(IdleKind::Spin));
        assert_eq!("yield".parse::<IdleKind>(), Ok(IdleKind::Yield));
        assert_eq!("park".parse::<IdleKind>(), Ok(IdleKind::Park));
        assert!("nap".parse::<IdleKind>().unwrap_err().contains("nap"));
        for kind in [IdleKind::Spin, IdleKind::Yield, IdleKind::Park] {
            let mut s = kind.build();
            s.idle(0);
            s.idle(1);
            s.reset();
        }
    }

    #[test]
    fn backoff_goes_spin_yield_park_and_resets_on_work() {
        let mut b = BackoffPark::new(2, 2, Duration::from_micros(10), Duration::from_micros(40));
        for _ in 0..4 {
            b.idle(0);
        }
        assert_eq!(b.count, 4);
        assert_eq!(b.park, Duration::from_micros(10));
        for _ in 0..4 {
            b.idle(0); // parks 10, 20, 40, 40 µs
        }
        assert_eq!(b.park, Duration::from_micros(40));
        b.idle(1);
        assert_eq!((b.count, b.park), (0, Duration::from_micros(10)));
        let mut s = SpinThenYield::new(3);
        for _ in 0..5 {
            s.idle(0);
        }
        assert_eq!(s.count, 3);
        s.idle(1);
        assert_eq!(s.count, 0);
    }
}
