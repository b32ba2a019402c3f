//! Live counters of one running side (a primary, a backup, or a VM run alone), read without
//! touching the hot paths: the metrics endpoint (`ftvm … --metrics ADDR`), `ftvm stat` and the
//! `--report` JSON all take the same [`Snapshot`].
//!
//! ```text
//!  vCPU thread ──────── exit counters (atomics) ─────────┐
//!  LogWriter / LogReader ─ positions, bytes, stalls ─────┤
//!  sender/receiver poller ─ SenderShared / Stats (atomics)┤  Observer::snapshot()
//!  output gate ───────── its stats (the lock it has) ────┼─────────────────────▶ Snapshot ──▶ Prometheus text
//!  throttle thread ───── ThrottleStatus (its lock) ──────┤  (the metrics thread,            ──▶ JSON (reports,
//!  failure detector ──── DetectorStats (its lock) ───────┘   once per scrape)                     /status.json)
//! ```
//!
//! Each part registers a *provider* (a closure over the state it already shares) when it
//! starts; the [`Observer`] is carried by the `LogWriter` / `LogReader` of the side, so no run
//! function changes signature. Reading adds no lock to a hot path: counters the vCPU or a
//! poller bump are atomics (one writer each, a load and a store); the structures the vCPU
//! thread locks anyway (the output gate's statistics, the shared-disk barrier's waits) are
//! locked once per scrape for a copy, taken outside of which everything is computed. The
//! provider list itself is behind a lock no hot path takes.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ftvm_channel::StatsSnapshot;
use serde::{Deserialize, Serialize};

use ftvm_vmm_core::vcpu::{ExitKind, ExitStats};

/// What a side is doing now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SideRole {
    /// A VM run alone (`ftvm run`), no pair.
    #[default]
    Run,
    /// The primary of a pair, logging.
    Primary,
    /// The backup, replaying.
    Backup,
    /// Live without a partner: the primary went on alone, or the backup went live.
    Alone,
    /// Superseded by a newer generation: stopped, releasing nothing.
    Fenced,
}

impl SideRole {
    /// `run`, `primary`, `backup`, `alone`, `fenced`.
    pub fn name(self) -> &'static str {
        match self {
            SideRole::Run => "run",
            SideRole::Primary => "primary",
            SideRole::Backup => "backup",
            SideRole::Alone => "alone",
            SideRole::Fenced => "fenced",
        }
    }

    const ALL: [SideRole; 5] = [
        SideRole::Run,
        SideRole::Primary,
        SideRole::Backup,
        SideRole::Alone,
        SideRole::Fenced,
    ];
}

/// VM exits so far.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ExitsSnapshot {
    /// All exits (the exit index).
    pub total: u64,
    /// Per kind (`sys_read`, `wait`, …, see [`ExitKind::name`]).
    pub by_kind: BTreeMap<String, u64>,
}

/// Positions in the log (sequence numbers) and what writing it cost.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LogSnapshot {
    /// Last entry written (primary) or received into the log buffer (backup).
    pub written: u64,
    /// Last entry handed to the transport (primary only).
    pub sent: Option<u64>,
    /// Last entry the backup acknowledged (holds in its buffer).
    pub acked: u64,
    /// Last entry the backup executed.
    pub executed: u64,
    /// Entries written (primary) or consumed by the replay (backup).
    pub entries: u64,
    /// Log payload bytes written (primary).
    pub bytes: Option<u64>,
    /// Times the vCPU found the log buffer full and waited (primary).
    pub stalls: u64,
    /// Time it waited, in ms.
    pub stall_ms: f64,
}

/// How far the backup's execution trails the primary's.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LagSnapshot {
    /// Entries written and not yet executed by the backup.
    pub entries: u64,
    /// The same in log bytes (when the throttle measures it).
    pub bytes: Option<u64>,
    /// Age of the oldest entry the backup has not executed, ms (when the throttle runs).
    pub ms: Option<f64>,
}

/// The primary's CPU throttle.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ThrottleSnapshot {
    /// `cgroup-v2`, `cgroup-v1`, `pacer`, `other`.
    pub actuator: String,
    /// The vCPU's share of a CPU now (1 = no limit).
    pub share: f64,
    /// Smallest share set so far.
    pub min_share: f64,
    /// The lag target, ms.
    pub target_ms: f64,
    /// Time lag at the last update, ms.
    pub lag_ms: f64,
    /// Largest time lag seen, ms.
    pub max_lag_ms: f64,
    /// Lag in log bytes, when measured.
    pub lag_bytes: Option<u64>,
    /// Time spent below full share, ms.
    pub throttled_ms: f64,
    /// Controller updates.
    pub updates: u64,
    /// Failed attempts to apply a share.
    pub actuator_errors: u64,
    /// Pauses the pacer made the vCPU take, and their total, ms.
    pub pacer_sleeps: u64,
    /// Total pause time, ms.
    pub pacer_slept_ms: f64,
}

/// One bucket of a histogram: how many values were at most `le`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Bucket {
    /// Upper bound (inclusive), in the histogram's unit.
    pub le: f64,
    /// Values ≤ `le` (cumulative).
    pub count: u64,
}

/// How long outputs waited for the backup's acknowledgement.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DelaySnapshot {
    /// Outputs measured.
    pub count: u64,
    /// Sum of their delays, seconds.
    pub sum_s: f64,
    /// Median, µs.
    pub p50_us: u64,
    /// 99th percentile, µs.
    pub p99_us: u64,
    /// Longest, µs.
    pub max_us: u64,
    /// Cumulative buckets, bounds in seconds ([`DELAY_BUCKETS_S`]).
    pub buckets: Vec<Bucket>,
}

/// Bucket bounds of the output-delay histogram, seconds: 100 µs (an ack round trip over
/// shared memory) to 2.5 s (a stalled backup).
pub const DELAY_BUCKETS_S: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// The output rule's counters (primary, or a backup once live).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct OutputsSnapshot {
    /// Outputs submitted.
    pub produced: u64,
    /// Outputs released.
    pub released: u64,
    /// Outputs waiting now (produced − released).
    pub held: u64,
    /// Bytes released.
    pub bytes: u64,
    /// Releases below the acknowledged position (must be 0).
    pub early: u64,
    /// Releases without acknowledgement because the side runs alone.
    pub released_alone: u64,
    /// Releases refused by the generation fence.
    pub fenced: u64,
    /// Most outputs waiting at once.
    pub max_pending: u64,
    /// The delay each output waited.
    pub delay: DelaySnapshot,
}

/// The log channel's counters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChannelSnapshot {
    /// The transport (`shm`, `tcp`, …).
    pub transport: String,
    /// Frames, bytes, retransmissions, drops, RTT.
    pub counters: StatsSnapshot,
}

/// The failure detector's counters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DetectorSnapshot {
    /// Heartbeats sent.
    pub heartbeats_sent: u64,
    /// Heartbeats that could not be sent.
    pub send_errors: u64,
    /// Valid heartbeats received from the peer.
    pub heartbeats_received: u64,
    /// Heartbeats ignored for an older generation.
    pub stale_heartbeats: u64,
    /// The peer's heartbeats that never arrived (gaps in its sequence numbers).
    #[serde(default)]
    pub heartbeats_missed: u64,
    /// Datagrams dropped (not a heartbeat, not from the peer).
    pub dropped: u64,
    /// Times the peer was presumed failed (its heartbeats and traffic missed for the timeout).
    pub failures_declared: u64,
    /// The last detection time, ms.
    pub last_detection_ms: Option<f64>,
}

/// Shared-disk writes held for the backup's acknowledgement.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DiskWaitsSnapshot {
    /// Write requests that passed the barrier.
    pub writes: u64,
    /// Of those, how many waited.
    pub waited: u64,
    /// Total wait, ms.
    pub time_ms: f64,
    /// Longest wait, ms.
    pub max_ms: f64,
    /// Writes that passed without waiting because the side ran alone.
    pub alone: u64,
}

/// Everything observed on one side at one instant (see the [module docs](self)).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Snapshot {
    /// What the side is doing.
    pub role: SideRole,
    /// The replication generation it acts in.
    pub generation: u64,
    /// Seconds since the observer was made (the side started).
    pub uptime_s: f64,
    /// VM exits.
    pub exits: Option<ExitsSnapshot>,
    /// Log positions.
    pub log: Option<LogSnapshot>,
    /// Lag of the backup.
    pub lag: Option<LagSnapshot>,
    /// The throttle (primary).
    pub throttle: Option<ThrottleSnapshot>,
    /// The output rule.
    pub outputs: Option<OutputsSnapshot>,
    /// The log channel.
    pub channel: Option<ChannelSnapshot>,
    /// The failure detector (with an arbiter).
    pub detector: Option<DetectorSnapshot>,
    /// Shared-disk waits (primary in shared-disk mode).
    pub disk_waits: Option<DiskWaitsSnapshot>,
}

/// A closure returning a part's counters.
pub type Provider<T> = Arc<dyn Fn() -> T + Send + Sync>;

#[derive(Default)]
struct Sources {
    exits: Option<(Arc<AtomicU64>, Arc<[AtomicU64; 7]>)>,
    log: Option<Provider<LogSnapshot>>,
    throttle: Option<Provider<ThrottleSnapshot>>,
    outputs: Option<Provider<OutputsSnapshot>>,
    channel: Option<Provider<StatsSnapshot>>,
    transport: String,
    detector: Option<Provider<DetectorSnapshot>>,
    disk_waits: Option<Provider<DiskWaitsSnapshot>>,
}

struct Inner {
    started: Instant,
    role: AtomicU8,
    generation: AtomicU64,
    sources: Mutex<Sources>,
}

/// The live counters of one side: parts register providers, readers take [`Snapshot`]s. Cheap
/// to clone (one `Arc`).
#[derive(Clone)]
pub struct Observer {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Observer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Observer")
            .field("role", &self.role())
            .finish_non_exhaustive()
    }
}

impl Default for Observer {
    fn default() -> Self {
        Self::new(SideRole::Run)
    }
}

macro_rules! setter {
    ($(#[$doc:meta])* $name:ident, $field:ident, $t:ty) => {
        $(#[$doc])*
        pub fn $name(&self, provider: impl Fn() -> $t + Send + Sync + 'static) {
            self.sources().$field = Some(Arc::new(provider));
        }
    };
}

impl Observer {
    /// An observer of a side in `role`, generation 1.
    pub fn new(role: SideRole) -> Self {
        Observer {
            inner: Arc::new(Inner {
                started: Instant::now(),
                role: AtomicU8::new(role as u8),
                generation: AtomicU64::new(1),
                sources: Mutex::default(),
            }),
        }
    }

    fn sources(&self) -> std::sync::MutexGuard<'_, Sources> {
        self.inner.sources.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The role now.
    pub fn role(&self) -> SideRole {
        let r = self.inner.role.load(Ordering::Relaxed);
        SideRole::ALL
            .into_iter()
            .find(|s| *s as u8 == r)
            .unwrap_or_default()
    }

    /// Records a change of role (and the generation it acts in).
    pub fn set_role(&self, role: SideRole, generation: u64) {
        self.inner.generation.store(generation, Ordering::Relaxed);
        self.inner.role.store(role as u8, Ordering::Relaxed);
    }

    /// Records the generation without a change of role.
    pub fn set_generation(&self, generation: u64) {
        self.inner.generation.store(generation, Ordering::Relaxed);
    }

    /// Watches a VM's exit counters.
    pub fn watch_exits(&self, stats: &ExitStats) {
        self.sources().exits = Some((Arc::clone(&stats.total), Arc::clone(&stats.by_kind)));
    }

    setter!(
        /// Sets the log positions' provider.
        set_log, log, LogSnapshot
    );
    setter!(
        /// Sets the throttle's provider.
        set_throttle, throttle, ThrottleSnapshot
    );
    setter!(
        /// Sets the output rule's provider.
        set_outputs, outputs, OutputsSnapshot
    );
    setter!(
        /// Sets the channel's provider.
        set_channel, channel, StatsSnapshot
    );

    /// Names the channel's transport (`shm`, `tcp`, …).
    pub fn set_transport(&self, name: &str) {
        self.sources().transport = name.to_string();
    }
    setter!(
        /// Sets the failure detector's provider.
        set_detector, detector, DetectorSnapshot
    );
    setter!(
        /// Sets the shared-disk barrier's provider.
        set_disk_waits, disk_waits, DiskWaitsSnapshot
    );

    /// Everything now.
    pub fn snapshot(&self) -> Snapshot {
        // Clone the providers, then call them without holding the list's lock.
        let (transport, exits, log, throttle, outputs, channel, detector, disk_waits) = {
            let s = self.sources();
            (
                s.transport.clone(),
                s.exits.clone(),
                s.log.clone(),
                s.throttle.clone(),
                s.outputs.clone(),
                s.channel.clone(),
                s.detector.clone(),
                s.disk_waits.clone(),
            )
        };
        fn call<T>(p: Option<Provider<T>>) -> Option<T> {
            p.map(|f| f())
        }
        let log: Option<LogSnapshot> = call(log);
        let throttle: Option<ThrottleSnapshot> = call(throttle);
        let lag = log.as_ref().map(|l| LagSnapshot {
            entries: l.written.saturating_sub(l.executed),
            bytes: throttle.as_ref().and_then(|t| t.lag_bytes),
            ms: throttle.as_ref().map(|t| t.lag_ms),
        });
        Snapshot {
            role: self.role(),
            generation: self.inner.generation.load(Ordering::Relaxed),
            uptime_s: self.inner.started.elapsed().as_secs_f64(),
            exits: exits.map(|(total, kinds)| ExitsSnapshot {
                total: total.load(Ordering::Relaxed),
                by_kind: ExitKind::ALL
                    .iter()
                    .zip(kinds.iter())
                    .map(|(k, n)| (k.name().to_string(), n.load(Ordering::Relaxed)))
                    .collect(),
            }),
            log,
            lag,
            throttle,
            outputs: call(outputs),
            channel: call(channel).map(|counters| ChannelSnapshot {
                transport,
                counters,
            }),
            detector: call(detector),
            disk_waits: call(disk_waits),
        }
    }
}

/// A histogram's snapshot from an HdrHistogram of microseconds.
pub fn delay_snapshot(h: &hdrhistogram::Histogram<u64>) -> DelaySnapshot {
    DelaySnapshot {
        count: h.len(),
        sum_s: h.mean() * h.len() as f64 / 1e6,
        p50_us: h.value_at_quantile(0.5),
        p99_us: h.value_at_quantile(0.99),
        max_us: h.max(),
        buckets: DELAY_BUCKETS_S
            .iter()
            .map(|&le| Bucket {
                le,
                count: h.count_between(0, (le * 1e6) as u64),
            })
            .collect(),
    }
}

/// Milliseconds of a duration, rounded to µs.
pub fn ms(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_read_the_registered_parts() {
        let o = Observer::new(SideRole::Primary);
        assert_eq!(o.snapshot().role, SideRole::Primary);
        assert!(o.snapshot().log.is_none());
        let stats = ExitStats::default();
        o.watch_exits(&stats);
        stats.total.store(7, Ordering::Relaxed);
        o.set_log(|| LogSnapshot {
            written: 10,
            executed: 4,
            ..Default::default()
        });
        o.set_role(SideRole::Alone, 2);
        let s = o.snapshot();
        assert_eq!((s.role, s.generation), (SideRole::Alone, 2));
        assert_eq!(s.exits.as_ref().map(|e| e.total), Some(7));
        assert_eq!(s.exits.map(|e| e.by_kind.len()), Some(7));
        assert_eq!(s.lag.map(|l| l.entries), Some(6));
        let json = serde_json::to_value(o.snapshot()).expect("json");
        assert_eq!(json["role"], "alone");
        let back: Snapshot = serde_json::from_value(json).expect("round trip");
        assert_eq!(back.log, o.snapshot().log);
    }

    #[test]
    fn delay_buckets_are_cumulative() {
        let mut h = hdrhistogram::Histogram::<u64>::new(3).expect("hist");
        for us in [50, 300, 300, 2_000, 700_000] {
            h.record(us).expect("record");
        }
        let d = delay_snapshot(&h);
        assert_eq!(d.count, 5);
        let at = |le: f64| d.buckets.iter().find(|b| b.le == le).map(|b| b.count);
        assert_eq!(at(0.0001), Some(1));
        assert_eq!(at(0.0005), Some(3));
        assert_eq!(at(0.0025), Some(4));
        assert_eq!(at(2.5), Some(5));
        assert!((d.sum_s - 0.70265).abs() < 0.01, "{}", d.sum_s);
    }
}
