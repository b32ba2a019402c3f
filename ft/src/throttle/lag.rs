//! Lag measurement: how far the backup's execution is behind the primary's, in entries, bytes
//! and time.
//!
//! The acks carry the backup's *executed* position (the last log sequence number its vCPU
//! consumed). The primary knows its own *logged* position. The difference is the lag in
//! entries. For the lag in time, the [`LagMeter`] keeps a ring of `(position, bytes, Instant)`
//! samples of the primary's log, taken by the controller thread every millisecond or so
//! (only when the position moved, so an idle primary does not push old samples out). The time
//! lag is the **age of the oldest entry the backup has not executed yet**:
//!
//! ```text
//! lag_time = 0                              if executed ≥ logged (caught up)
//!          = now − produced(executed + 1)   otherwise
//! ```
//!
//! where `produced(s)` is interpolated between the two samples around `s` (error below one
//! sample interval). Unlike "now − produced(executed)", it does not grow while a caught-up pair
//! sits idle.
//!
//! The time lag reacts to a change of the primary's speed only once the backup reaches the
//! entries produced after it: a dead time equal to the lag itself, which would make a feedback
//! loop on it oscillate. So the meter also *predicts* the lag: the time the backup needs to
//! execute the entries it has not executed yet, at its recent execution rate
//! (`predicted = (logged − executed) / rate`, the rate a low-pass filtered derivative of the
//! executed position, updated only while the backup had work). It is the age the newest entry
//! will have when the backup executes it, so it equals the time lag in steady state and leads
//! it in transients; the controller acts on it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ftvm_channel::reliable::SenderShared;

use crate::primary::LogWriter;

/// Where the lag comes from: the primary's logged position and the backup's reported ones.
pub trait LagSource: Send + 'static {
    /// The last sequence number the primary logged.
    fn logged_seq(&self) -> u64;
    /// Log bytes written so far by the primary, if known (for the lag in bytes).
    fn logged_bytes(&self) -> Option<u64>;
    /// The last sequence number the backup reported executed.
    fn executed_seq(&self) -> u64;
    /// The last sequence number the backup acknowledged (holds in its buffer).
    fn acked_seq(&self) -> u64;
    /// Whether there is a backup to keep in step with (false once the primary runs alone:
    /// the throttle then gives the vCPU its full share back).
    fn replicating(&self) -> bool {
        true
    }
}

/// The lag source of a primary: its log position (`LogWriter::position()`) and the sender's
/// shared ack state (`LogWriter::sender().shared()`).
#[derive(Debug, Clone)]
pub struct PairLag {
    shared: Arc<SenderShared>,
    position: Arc<AtomicU64>,
    bytes: Option<Arc<AtomicU64>>,
    writer: Option<LogWriter>,
}

impl PairLag {
    /// A source over the sender's shared state and the writer's position.
    pub fn new(shared: Arc<SenderShared>, position: Arc<AtomicU64>) -> Self {
        PairLag {
            shared,
            position,
            bytes: None,
            writer: None,
        }
    }

    /// The source of a primary's `writer`: its position, its byte counter (lag in bytes), and
    /// whether it still replicates (not alone).
    pub fn for_writer(writer: &LogWriter) -> Self {
        PairLag {
            shared: Arc::clone(writer.sender().shared()),
            position: Arc::clone(writer.position()),
            bytes: Some(writer.bytes_counter()),
            writer: Some(writer.clone()),
        }
    }

    /// Also reports the lag in bytes from a counter of log bytes written.
    pub fn with_bytes(mut self, bytes: Arc<AtomicU64>) -> Self {
        self.bytes = Some(bytes);
        self
    }
}

impl LagSource for PairLag {
    fn logged_seq(&self) -> u64 {
        self.position.load(Ordering::Acquire)
    }
    fn logged_bytes(&self) -> Option<u64> {
        self.bytes.as_ref().map(|b| b.load(Ordering::Relaxed))
    }
    fn executed_seq(&self) -> u64 {
        self.shared.executed_seq()
    }
    fn acked_seq(&self) -> u64 {
        self.shared.acked_seq()
    }
    fn replicating(&self) -> bool {
        self.writer.as_ref().is_none_or(|w| !w.is_alone())
    }
}

/// One sample of the primary's log position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LagSample {
    /// Last logged sequence number.
    pub seq: u64,
    /// Bytes logged so far (0 when unknown).
    pub bytes: u64,
    /// When the sample was taken.
    pub at: Instant,
}

/// The lag at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Lag {
    /// Last logged sequence number.
    pub logged_seq: u64,
    /// Last sequence number the backup executed.
    pub executed_seq: u64,
    /// Last sequence number the backup acknowledged.
    pub acked_seq: u64,
    /// `logged − executed`.
    pub entries: u64,
    /// Log bytes between the executed and the logged position (from the samples), if the
    /// source counts bytes.
    pub bytes: Option<u64>,
    /// Age of the oldest entry the backup has not executed (zero when caught up).
    pub time: Duration,
    /// Whether the time is a lower bound (the oldest unexecuted entry is older than every
    /// sample kept).
    pub saturated: bool,
    /// Predicted lag: time for the backup to execute the `entries` at its recent rate (the
    /// time lag itself while the rate is unknown).
    pub predicted: Duration,
    /// The backup's recent execution rate (entries/s), once known.
    pub backup_rate: Option<f64>,
}

/// Longest predicted lag reported (the backup stopped: its rate is zero).
pub const MAX_PREDICTED: Duration = Duration::from_secs(3600);

/// Time constant of the low-pass filter on the backup's execution rate (seconds).
pub const RATE_TAU: f64 = 0.1;

/// Samples of the primary's log position over time, and the lag computed from them.
#[derive(Debug)]
pub struct LagMeter {
    samples: VecDeque<LagSample>,
    capacity: usize,
    /// Executed position, when, and whether the backup had entries to execute then.
    last_exec: Option<(u64, Instant, bool)>,
    rate: Option<f64>,
}

impl LagMeter {
    /// A meter keeping at most `capacity` samples (at one per millisecond while the primary
    /// logs, 16384 cover 16 s of lag).
    pub fn new(capacity: usize) -> Self {
        LagMeter {
            samples: VecDeque::with_capacity(capacity.min(1 << 16)),
            capacity: capacity.max(2),
            last_exec: None,
            rate: None,
        }
    }

    /// Records the primary's position at `at` (ignored unless it moved).
    pub fn sample(&mut self, seq: u64, bytes: Option<u64>, at: Instant) {
        if let Some(last) = self.samples.back() {
            if seq <= last.seq {
                return;
            }
        }
        if self.samples.len() == self.capacity {
            self.samples.pop_front();
        }
        self.samples.push_back(LagSample {
            seq,
            bytes: bytes.unwrap_or(0),
            at,
        });
    }

    /// Samples kept.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// Whether no sample was taken yet.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// When the primary produced `seq`, interpolated between samples; `None` if it is older
    /// than every sample kept (or no sample covers it yet).
    pub fn produced_at(&self, seq: u64) -> Option<Instant> {
        // First sample with position ≥ seq.
        let i = self.samples.partition_point(|s| s.seq < seq);
        let after = self.samples.get(i)?;
        if i == 0 {
            return (after.seq == seq).then_some(after.at);
        }
        let before = self.samples.get(i - 1)?;
        // Entries before..after were produced between the two sample times; spread evenly.
        let span = (after.seq - before.seq) as f64;
        let frac = (seq - before.seq) as f64 / span;
        let dt = after.at.saturating_duration_since(before.at);
        Some(before.at + dt.mul_f64(frac.clamp(0.0, 1.0)))
    }

    fn bytes_at(&self, seq: u64) -> Option<u64> {
        let i = self.samples.partition_point(|s| s.seq < seq);
        let after = self.samples.get(i)?;
        if i == 0 {
            return Some(after.bytes);
        }
        let before = self.samples.get(i - 1)?;
        let frac = (seq - before.seq) as f64 / (after.seq - before.seq) as f64;
        Some(before.bytes + ((after.bytes - before.bytes) as f64 * frac) as u64)
    }

    /// Updates the backup's execution rate from its position `executed` at `now` (only over
    /// intervals that began with entries to execute: an idle backup's rate says nothing about
    /// its speed).
    fn observe_executed(&mut self, executed: u64, busy: bool, now: Instant) {
        if let Some((e0, t0, was_busy)) = self.last_exec {
            let dt = now.saturating_duration_since(t0).as_secs_f64();
            if dt < 0.002 {
                return;
            }
            if was_busy {
                let inst = executed.saturating_sub(e0) as f64 / dt;
                let a = 1.0 - (-dt / RATE_TAU).exp();
                self.rate = Some(self.rate.map_or(inst, |r| r + (inst - r) * a));
            }
        }
        self.last_exec = Some((executed, now, busy));
    }

    /// The backup's recent execution rate (entries/s), once known.
    pub fn backup_rate(&self) -> Option<f64> {
        self.rate
    }

    /// The lag now, given the positions read from the source (also feeds the backup's rate
    /// estimate: call it regularly, every few milliseconds).
    pub fn lag(
        &mut self,
        logged_seq: u64,
        logged_bytes: Option<u64>,
        executed_seq: u64,
        acked_seq: u64,
        now: Instant,
    ) -> Lag {
        let entries = logged_seq.saturating_sub(executed_seq);
        self.observe_executed(executed_seq, entries > 0, now);
        let mut lag = Lag {
            logged_seq,
            executed_seq,
            acked_seq,
            entries,
            bytes: logged_bytes.map(|_| 0),
            time: Duration::ZERO,
            saturated: false,
            predicted: Duration::ZERO,
            backup_rate: self.rate,
        };
        if entries == 0 {
            return lag;
        }
        let oldest = executed_seq + 1;
        match self.produced_at(oldest) {
            Some(t) => lag.time = now.saturating_duration_since(t),
            None => {
                if let Some(first) = self.samples.front() {
                    if first.seq > oldest {
                        lag.time = now.saturating_duration_since(first.at);
                        lag.saturated = true;
                    }
                }
            }
        }
        if let (Some(b), Some(at)) = (logged_bytes, self.bytes_at(executed_seq)) {
            lag.bytes = Some(b.saturating_sub(at));
        }
        lag.predicted = match self.rate {
            Some(r) if r * MAX_PREDICTED.as_secs_f64() > entries as f64 => {
                Duration::from_secs_f64(entries as f64 / r)
            }
            Some(_) => MAX_PREDICTED,
            None => lag.time,
        };
        lag
    }

    /// The lag now, reading the positions from `source`.
    pub fn measure(&mut self, source: &dyn LagSource, now: Instant) -> Lag {
        // Executed first: a position read after it is never behind it.
        let executed = source.executed_seq();
        let acked = source.acked_seq();
        self.lag(
            source.logged_seq(),
            source.logged_bytes(),
            executed,
            acked,
            now,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn time_lag_is_the_age_of_the_oldest_unexecuted_entry() {
        let t0 = Instant::now();
        let mut m = LagMeter::new(100);
        // Entries 1..=10 at 1 ms each, 100 bytes each.
        for i in 1..=10u64 {
            m.sample(i, Some(i * 100), t0 + ms(i));
        }
        let now = t0 + ms(20);
        // Backup executed 4: entry 5 (produced at 5 ms) is the oldest pending → 15 ms.
        let lag = m.lag(10, Some(1000), 4, 8, now);
        assert_eq!(lag.entries, 6);
        assert_eq!(lag.time, ms(15));
        assert_eq!(lag.bytes, Some(600));
        assert!(!lag.saturated);
        // Caught up: no lag, however long ago the last entry was.
        let lag = m.lag(10, Some(1000), 10, 10, t0 + ms(5000));
        assert_eq!((lag.entries, lag.time), (0, Duration::ZERO));
    }

    #[test]
    fn interpolates_between_sparse_samples() {
        let t0 = Instant::now();
        let mut m = LagMeter::new(100);
        m.sample(100, None, t0);
        m.sample(200, None, t0 + ms(10));
        // Entry 150 was produced about half-way.
        let at = m.produced_at(150).expect("covered");
        assert_eq!(at.duration_since(t0), ms(5));
        assert_eq!(m.produced_at(200), Some(t0 + ms(10)));
        assert_eq!(m.produced_at(201), None, "not produced yet");
        assert_eq!(m.produced_at(100), Some(t0));
        assert_eq!(m.produced_at(99), None, "older than every sample");
    }

    #[test]
    fn idle_primary_keeps_old_samples_and_old_lag_saturates() {
        let t0 = Instant::now();
        let mut m = LagMeter::new(4);
        m.sample(1, None, t0);
        for i in 0..100 {
            m.sample(1, None, t0 + ms(i)); // no movement: ignored
        }
        assert_eq!(m.len(), 1);
        for i in 2..=6u64 {
            m.sample(i, None, t0 + ms(i * 10));
        }
        assert_eq!(m.len(), 4, "ring keeps its capacity");
        // Backup executed nothing: entry 1 is older than the oldest sample (seq 3 at 30 ms).
        let lag = m.lag(6, None, 0, 0, t0 + ms(100));
        assert!(lag.saturated);
        assert_eq!(lag.time, ms(70));
        assert_eq!(lag.bytes, None);
    }

    #[test]
    fn predicts_the_lag_from_the_backup_rate() {
        let t0 = Instant::now();
        let mut m = LagMeter::new(1000);
        // The primary logs 10 entries/ms; the backup executes 2 entries/ms with a backlog.
        let mut lag = Lag::default();
        for i in 0..=200u64 {
            let now = t0 + ms(i);
            m.sample(10 * i + 10, None, now);
            lag = m.lag(10 * i + 10, None, 2 * i, 0, now);
        }
        let rate = lag.backup_rate.expect("rate known");
        assert!((rate - 2000.0).abs() < 20.0, "{rate}");
        // 1610 entries at 2000/s: 805 ms to catch up.
        assert_eq!(lag.entries, 1610);
        assert!(
            (lag.predicted.as_secs_f64() - 0.805).abs() < 0.01,
            "{lag:?}"
        );
        // The age of entry 401 (produced at ~39 ms) is ~161 ms: the prediction leads it.
        assert!((lag.time.as_secs_f64() - 0.161).abs() < 0.002, "{lag:?}");
        // A backup that stops: the prediction grows without bound (capped).
        for i in 201..=2000u64 {
            let now = t0 + ms(i);
            m.sample(10 * i + 10, None, now);
            lag = m.lag(10 * i + 10, None, 400, 0, now);
        }
        assert!(lag.predicted > Duration::from_secs(60), "{lag:?}");
        // An idle backup's rate is not updated: no entries pending, no information.
        m.lag(20_010, None, 20_010, 0, t0 + ms(2100));
        let before = m.backup_rate();
        m.lag(20_010, None, 20_010, 0, t0 + ms(2200));
        m.lag(20_010, None, 20_010, 0, t0 + ms(2300));
        assert_eq!(m.backup_rate(), before);
    }

    #[test]
    fn measures_through_a_source() {
        struct Fixed;
        impl LagSource for Fixed {
            fn logged_seq(&self) -> u64 {
                3
            }
            fn logged_bytes(&self) -> Option<u64> {
                None
            }
            fn executed_seq(&self) -> u64 {
                1
            }
            fn acked_seq(&self) -> u64 {
                3
            }
        }
        let t0 = Instant::now();
        let mut m = LagMeter::new(8);
        m.sample(1, None, t0);
        m.sample(3, None, t0 + ms(2));
        let lag = m.measure(&Fixed, t0 + ms(3));
        assert_eq!((lag.entries, lag.acked_seq), (2, 3));
        assert_eq!(lag.time, ms(2));
    }

    #[test]
    fn pair_lag_reads_positions() {
        let shared = Arc::new(SenderShared::default());
        let pos = Arc::new(AtomicU64::new(42));
        let bytes = Arc::new(AtomicU64::new(4200));
        let src = PairLag::new(shared, pos.clone()).with_bytes(bytes);
        assert_eq!(src.logged_seq(), 42);
        assert_eq!(src.logged_bytes(), Some(4200));
        assert_eq!((src.executed_seq(), src.acked_seq()), (0, 0));
        pos.store(43, Ordering::Release);
        assert_eq!(src.logged_seq(), 43);
    }
}
