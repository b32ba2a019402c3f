//! Flow control and CPU throttling of the primary (issue #8): keep the backup's execution
//! within a target time lag of the primary's by lowering the primary vCPU's CPU share, and give
//! the share back when the lag falls.
//!
//! ```text
//!  primary vCPU ──log──▶ sender ══ transport ══▶ backup vCPU (replays)
//!      ▲ cpu.max | cpu.cfs_quota_us, and pauses at exits   ▲ acks: acked, executed position
//!      │                       │
//!  CgroupCpu + Pacer ◀── share ── PiController ◀── lag ── LagMeter ◀── (logged position, Instant)
//!                         (controller thread: samples every 1 ms, acts every 10 ms)
//! ```
//!
//! - [`lag`]: the lag in entries, bytes and time ([`LagMeter`]; the time lag is the age of the
//!   oldest entry the backup has not executed; the controller acts on its prediction, the time
//!   the backup needs to execute its backlog, which has no dead time).
//! - [`pi`]: the PI controller (on the logarithm of the share, with anti-windup and a low-pass
//!   filter on the lag), pure and unit-tested against a simulated plant.
//! - [`cgroup`]: the scheduler-level actuator, a `cpu` group holding the vCPU thread: a
//!   threaded sub-cgroup with `cpu.max` on cgroup v2, `cpu.cfs_quota_us` on v1, found from
//!   `/proc/self/cgroup` and `/proc/self/mountinfo` (also inside a network namespace).
//! - [`pace`]: the pause-based actuator, a token bucket of CPU time the vCPU thread checks at
//!   its logged exits ([`Throttle::for_writer`] drives both with the same share).
//! - [`control`]: a target change agreed through the log (a control entry applied by both
//!   sides at the same exit index).
//! - The throttle experiment (a primary/backup pair in one process with the backup slowed by a
//!   cgroup on a schedule, sampled over time, for the scenario tests and the `throttle`
//!   benchmark) is test tooling: `ftvm_testkit::experiment`.
//! - [`Throttle`]: the controller thread tying them together; [`ThrottleStatus`] is its state
//!   for counters and the periodic status line (`tracing` target `ftvm::throttle`).
//!
//! # Which actuators run
//!
//! [`Throttle::for_writer`] drives the cgroup *and* the pacer with the same share. When no
//! cgroup can be used (no `cpu` controller offered to this process, not root, read-only
//! cgroupfs, or [`CgroupPlace::Off`]) the pacer throttles alone: one warning says so and
//! [`ThrottleStatus::actuator`] is [`ActuatorKind::Pacer`]. The pacer needs nothing from the
//! host, so a primary with a backup is never unthrottled because of the host's cgroup setup;
//! what it loses without the quota is the cap on a guest that runs long between exits.
//!
//! A full log buffer is the last line of defence and needs no controller: the vCPU waits in
//! `LogWriter` for space (nothing is lost or reordered). The throttle keeps the pair away from it.
//!
//! # Tuning knobs ([`ThrottleConfig`])
//!
//! | knob | default | effect |
//! |---|---|---|
//! | `target` | 100 ms | the lag the pair must stay under (p99 once settled) |
//! | `setpoint_fraction` | 0.4 | the controller regulates the lag to `target × fraction`, leaving the rest as margin for bursts (CPU-time hiccups of either host) |
//! | `pi.kp` | 0.3 | proportional gain: log-share per unit of normalised error `(setpoint − lag)/setpoint`; higher reacts faster, oscillates sooner |
//! | `pi.ki` | 0.8 /s | integral gain: removes the steady-state error; higher settles faster, overshoots more |
//! | `pi.min_share` | 0.1 | the primary never gets less than this share of a CPU (a backup that stops entirely is the failure detector's business) |
//! | `pi.filter_tau` | 50 ms | low-pass time constant on the measured lag (smooths the CFS on/off bursts) |
//! | `cfs_period` | 10 ms | the cgroup's CFS period: the throttled vCPU runs `share × period`, then waits; short = smooth |
//! | `update_interval` | 10 ms | how often the controller acts |
//! | `sample_interval` | 1 ms | how often the primary's position is sampled (time-lag resolution) |
//! | `status_interval` | 1 s | period of the status line (0: none) |
//! | `cpu_weight` | kernel default (1024) | `cpu.shares` of the vCPU's cgroup against the host's other work |
//!
//! # Example
//!
//! ```no_run
//! use std::sync::atomic::AtomicU64;
//! use std::sync::Arc;
//! use std::time::Duration;
//! use ftvm_channel::reliable::SenderShared;
//! use ftvm_ft::throttle::{current_tid, PairLag, Throttle, ThrottleConfig};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // In a primary: `writer.sender().shared()` and `writer.position()` of its `LogWriter`,
//! // and the tid of the thread that runs the vCPU (here: this one). With the `LogWriter` at
//! // hand, `Throttle::for_writer(cfg, &writer, current_tid())` does this and also follows
//! // target changes agreed through the log.
//! let (acks, position) = (Arc::new(SenderShared::default()), Arc::new(AtomicU64::new(0)));
//! let throttle = Throttle::start(
//!     ThrottleConfig { target: Duration::from_millis(100), ..Default::default() },
//!     PairLag::new(acks, position),
//!     current_tid(),
//! )?;
//! // ... run the primary ...
//! let s = throttle.status();
//! println!("share {:.2}, lag {:.1} ms / target {} ms", s.share, s.lag_ms, s.target_ms);
//! throttle.stop();
//! # Ok(())
//! # }
//! ```

pub mod cgroup;
pub mod control;
pub mod lag;
pub mod pace;
pub mod pi;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::share::{Pacer, ShareCap};
pub use cgroup::{
    cgroup_cpu_unusable, current_tid, thread_cpu_time, CgroupCpu, CgroupVersion, CpuHierarchy,
};
pub use control::{propose_target, AgreedTarget, TargetFollower, CONTROL_TARGET_US};
pub use lag::{Lag, LagMeter, LagSource, PairLag};
pub use pace::Paced;
pub use pi::{PiConfig, PiController};

use crate::primary::LogWriter;

pub use crate::error::ThrottleError;

/// The messages of an error and its sources, joined with `: `.
pub(crate) use ftvm_vmm_core::error_chain as error_text;

/// Something that sets the primary vCPU's CPU share.
pub trait Actuator: Send + 'static {
    /// Sets the share (in `(0, 1]`; 1 = no limit).
    ///
    /// # Errors
    /// The share could not be applied.
    fn set_share(&mut self, share: f64) -> Result<(), ThrottleError>;
    /// A short description for logs.
    fn describe(&self) -> String;
    /// Which mechanism it is (for reports and metrics).
    fn kind(&self) -> ActuatorKind {
        ActuatorKind::Other
    }
}

/// The mechanism that holds the primary's vCPU to its share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ActuatorKind {
    /// A cgroup v2 threaded group (`cpu.max`) and the pacer.
    CgroupV2,
    /// A cgroup v1 group (`cpu.cfs_quota_us`) and the pacer.
    CgroupV1,
    /// The pacer alone (no cgroup could be used).
    Pacer,
    /// Something else (a simulation, an experiment's observer).
    #[default]
    Other,
}

impl ActuatorKind {
    /// `cgroup-v2`, `cgroup-v1`, `pacer`, `other` (the names in reports and metrics).
    pub fn name(self) -> &'static str {
        match self {
            ActuatorKind::CgroupV2 => CgroupVersion::V2.name(),
            ActuatorKind::CgroupV1 => CgroupVersion::V1.name(),
            ActuatorKind::Pacer => "pacer",
            ActuatorKind::Other => "other",
        }
    }
}

/// Where the throttle's cgroup goes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum CgroupPlace {
    /// Under this process's own cgroup in the `cpu` controller's hierarchy
    /// ([`CpuHierarchy::find`]).
    #[default]
    Auto,
    /// Under this cgroup directory (a delegated cgroup, or a hierarchy a test mounted;
    /// [`CpuHierarchy::at`]).
    At(PathBuf),
    /// No cgroup: the pacer alone.
    Off,
}

impl Actuator for CgroupCpu {
    fn set_share(&mut self, share: f64) -> Result<(), ThrottleError> {
        CgroupCpu::set_share(self, share)
    }
    fn kind(&self) -> ActuatorKind {
        match self.version() {
            CgroupVersion::V1 => ActuatorKind::CgroupV1,
            CgroupVersion::V2 => ActuatorKind::CgroupV2,
        }
    }
    fn describe(&self) -> String {
        format!(
            "cgroup {} (period {:?})",
            self.path().display(),
            self.period()
        )
    }
}

/// Parameters of a [`Throttle`] (the tuning knobs of the module docs).
#[derive(Debug, Clone)]
pub struct ThrottleConfig {
    /// Lag to stay under.
    pub target: Duration,
    /// The controller regulates the lag to `target × setpoint_fraction` (in `(0, 1]`).
    pub setpoint_fraction: f64,
    /// Gains and limits.
    pub pi: PiConfig,
    /// How often the primary's position is sampled.
    pub sample_interval: Duration,
    /// How often the controller acts.
    pub update_interval: Duration,
    /// CFS period of the vCPU's cgroup.
    pub cfs_period: Duration,
    /// Period of the status line (zero: none).
    pub status_interval: Duration,
    /// Position samples kept (at one per `sample_interval` while logging).
    pub samples: usize,
    /// Name of the cgroup (default `ftvm-<pid>-primary-<n>`).
    pub group_name: Option<String>,
    /// `cpu.shares` of the cgroup (`None`: the kernel's default, 1024): the vCPU's weight
    /// against the host's other work when the CPUs are contended.
    pub cpu_weight: Option<u64>,
    /// Where the cgroup goes ([`Throttle::for_writer`] falls back to the pacer alone when it
    /// cannot be used).
    pub cgroup: CgroupPlace,
}

impl Default for ThrottleConfig {
    fn default() -> Self {
        ThrottleConfig {
            target: Duration::from_millis(100),
            setpoint_fraction: 0.4,
            pi: PiConfig::default(),
            sample_interval: Duration::from_millis(1),
            update_interval: Duration::from_millis(10),
            cfs_period: Duration::from_millis(10),
            status_interval: Duration::from_secs(1),
            samples: 16_384,
            group_name: None,
            cpu_weight: None,
            cgroup: CgroupPlace::Auto,
        }
    }
}

impl ThrottleConfig {
    fn check(&self) -> Result<(), ThrottleError> {
        let bad = |what: &str| Err(ThrottleError::Config(what.to_string()));
        if self.target.is_zero() {
            return bad("target must be > 0");
        }
        if !(self.setpoint_fraction > 0.0 && self.setpoint_fraction <= 1.0) {
            return bad("setpoint_fraction must be in (0, 1]");
        }
        if !(self.pi.kp >= 0.0 && self.pi.ki >= 0.0 && self.pi.filter_tau >= 0.0) {
            return bad("kp, ki and filter_tau must be >= 0");
        }
        if !(self.pi.min_share > 0.0 && self.pi.min_share <= 1.0) {
            return bad("min_share must be in (0, 1]");
        }
        if self.sample_interval.is_zero() || self.update_interval < self.sample_interval {
            return bad("need 0 < sample_interval <= update_interval");
        }
        Ok(())
    }
}

/// The throttle's state, for counters and the status line.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ThrottleStatus {
    /// The primary vCPU's CPU share now (1 = no limit).
    pub share: f64,
    /// Smallest share set so far.
    pub min_share: f64,
    /// The lag target (ms).
    pub target_ms: f64,
    /// The lag the controller regulates to (ms).
    pub setpoint_ms: f64,
    /// Time lag at the last update (ms): age of the oldest entry the backup has not executed.
    pub lag_ms: f64,
    /// Predicted lag at the last update (ms): time for the backup to execute what it has not
    /// executed yet, at its recent rate (see [`lag`]).
    pub lag_predicted_ms: f64,
    /// The low-pass filtered predicted lag the controller acts on (ms).
    pub lag_filtered_ms: f64,
    /// The backup's recent execution rate (entries/s; 0 until known).
    pub backup_rate: f64,
    /// Largest time lag seen (ms).
    pub max_lag_ms: f64,
    /// Lag in entries (logged − executed).
    pub lag_entries: u64,
    /// Lag in log bytes, when the lag source counts bytes.
    pub lag_bytes: Option<u64>,
    /// Last logged sequence number.
    pub logged_seq: u64,
    /// Last sequence number the backup executed.
    pub executed_seq: u64,
    /// Last sequence number the backup acknowledged.
    pub acked_seq: u64,
    /// Time spent with the share below 1.
    pub throttled: Duration,
    /// Controller updates so far.
    pub updates: u64,
    /// Failed attempts to apply a share.
    pub actuator_errors: u64,
    /// The mechanism applying the share.
    pub actuator: ActuatorKind,
}

#[derive(Debug)]
struct Inner {
    stop: AtomicBool,
    /// The bound on the share set from outside ([`ShareCap`]).
    cap: ShareCap,
    target_ns: AtomicU64,
    status: Mutex<ThrottleStatus>,
    /// The last target agreed through the log (shared by every follower of this throttle).
    agreed: Arc<Mutex<Option<AgreedTarget>>>,
}

impl Inner {
    fn set_target(&self, target: Duration) {
        let ns = target.as_nanos().clamp(1, u64::MAX as u128) as u64;
        self.target_ns.store(ns, Ordering::Release);
    }
}

/// The throttle controller: a thread sampling the lag and setting the primary vCPU's share.
/// Stopping (or dropping) it restores full speed and removes its cgroup.
#[derive(Debug)]
pub struct Throttle {
    inner: Arc<Inner>,
    thread: Option<JoinHandle<()>>,
    actuator: String,
    kind: ActuatorKind,
}

impl Throttle {
    /// Starts a throttle acting on thread `vcpu_tid` through a new cgroup v1 `cpu` group.
    ///
    /// # Errors
    /// [`ThrottleError`]: no usable cpu controller, not permitted, bad configuration.
    pub fn start(
        cfg: ThrottleConfig,
        source: impl LagSource,
        vcpu_tid: i32,
    ) -> Result<Self, ThrottleError> {
        let group = Self::vcpu_group(&cfg, vcpu_tid)?;
        Self::with_actuator(cfg, source, Box::new(group))
    }

    /// A new `cpu` group holding thread `vcpu_tid`, as `cfg` says (after removing the stale
    /// groups of dead processes beside it).
    fn vcpu_group(cfg: &ThrottleConfig, vcpu_tid: i32) -> Result<CgroupCpu, ThrottleError> {
        cfg.check()?;
        static GROUPS: AtomicU64 = AtomicU64::new(0);
        let name = cfg.group_name.clone().unwrap_or_else(|| {
            let n = GROUPS.fetch_add(1, Ordering::Relaxed);
            format!("ftvm-{}-primary-{n}", std::process::id())
        });
        let hierarchy = match &cfg.cgroup {
            CgroupPlace::Auto => CpuHierarchy::find()?,
            CgroupPlace::At(dir) => CpuHierarchy::at(dir)?,
            CgroupPlace::Off => {
                return Err(ThrottleError::NoCpuController {
                    why: "turned off (pacer only)".into(),
                })
            }
        };
        hierarchy.remove_stale();
        let mut group = CgroupCpu::create_in(&hierarchy, &name, cfg.cfs_period)?;
        if let Some(w) = cfg.cpu_weight {
            group.set_weight(w)?;
        }
        group.add_thread(vcpu_tid)?;
        Ok(group)
    }

    /// [`Throttle::for_writer`] on the calling thread (the vCPU's: [`current_tid`]), and says
    /// so in one line naming `side` (`primary`, `live as a primary`), the target, the smallest
    /// share and the actuator: the start that the primary's and a went-live backup's runs share.
    ///
    /// # Errors
    /// As [`Throttle::for_writer`].
    pub fn on_this_thread(
        cfg: &ThrottleConfig,
        writer: &LogWriter,
        side: &str,
    ) -> Result<Self, ThrottleError> {
        let t = Self::for_writer(cfg.clone(), writer, current_tid())?;
        tracing::info!(
            target: "ftvm::throttle",
            target_ms = cfg.target.as_millis() as u64,
            min_share = cfg.pi.min_share,
            actuator = t.actuator(),
            "{side}: CPU throttle on"
        );
        Ok(t)
    }

    /// Starts a throttle for the primary writing through `writer`, acting on thread `vcpu_tid`
    /// (the thread that will call `run_primary`: [`current_tid`] there), and makes it follow
    /// the target changes agreed through the log ([`propose_target`] on `writer.controls()`;
    /// this sets the queue's handler, see [`TargetFollower`]). It paces the vCPU at its
    /// exits and sets a cgroup's quota; when no cgroup can be used it warns once and paces
    /// alone ([module docs](self), "Which actuators run").
    ///
    /// Stop it (or drop it) when the run ends or the primary goes on alone: without acks the
    /// lag only grows, and the throttle would hold the vCPU at its minimum share.
    ///
    /// # Errors
    /// As [`Throttle::start`].
    pub fn for_writer(
        cfg: ThrottleConfig,
        writer: &LogWriter,
        vcpu_tid: i32,
    ) -> Result<Self, ThrottleError> {
        cfg.check()?;
        let group: Option<Box<dyn Actuator>> = match Self::vcpu_group(&cfg, vcpu_tid) {
            Ok(g) => Some(Box::new(g)),
            Err(e) => {
                if cfg.cgroup != CgroupPlace::Off {
                    tracing::warn!(
                        target: "ftvm::throttle",
                        error = %error_text(&e),
                        "no writable cgroup for the vCPU thread: the pacer alone throttles it (a guest running long between exits is not capped)"
                    );
                }
                None
            }
        };
        // The quota, and pacing at the vCPU's logged exits (module `pace`).
        let pacer = Arc::new(Pacer::default());
        writer.set_pacer(Arc::clone(&pacer));
        let actuator = Paced {
            inner: group,
            pacer: Arc::clone(&pacer),
        };
        let throttle = Self::capped(
            cfg,
            PairLag::for_writer(writer),
            Box::new(actuator),
            writer.share_cap().clone(),
        )?;
        throttle.follower().install(writer.controls());
        let inner = Arc::clone(&throttle.inner);
        writer.observer().set_throttle(move || {
            let s = *inner.status.lock().unwrap_or_else(|e| e.into_inner());
            let (sleeps, slept) = pacer.slept();
            crate::observe::ThrottleSnapshot {
                actuator: s.actuator.name().to_string(),
                share: s.share,
                min_share: s.min_share,
                target_ms: s.target_ms,
                lag_ms: s.lag_ms,
                max_lag_ms: s.max_lag_ms,
                lag_bytes: s.lag_bytes,
                throttled_ms: crate::observe::ms(s.throttled),
                updates: s.updates,
                actuator_errors: s.actuator_errors,
                pacer_sleeps: sleeps,
                pacer_slept_ms: crate::observe::ms(slept),
            }
        });
        Ok(throttle)
    }

    /// Starts a throttle driving any actuator (another mechanism, a simulation).
    ///
    /// # Errors
    /// [`ThrottleError::Config`], [`ThrottleError::Spawn`].
    pub fn with_actuator(
        cfg: ThrottleConfig,
        source: impl LagSource,
        actuator: Box<dyn Actuator>,
    ) -> Result<Self, ThrottleError> {
        Self::capped(cfg, source, actuator, ShareCap::default())
    }

    /// As [`Throttle::with_actuator`], obeying `cap`.
    fn capped(
        cfg: ThrottleConfig,
        source: impl LagSource,
        mut actuator: Box<dyn Actuator>,
        cap: ShareCap,
    ) -> Result<Self, ThrottleError> {
        cfg.check()?;
        actuator.set_share(1.0)?;
        let describe = actuator.describe();
        let kind = actuator.kind();
        cap.obeyed.fetch_add(1, Ordering::AcqRel);
        let inner = Arc::new(Inner {
            stop: AtomicBool::new(false),
            cap,
            agreed: Arc::default(),
            target_ns: AtomicU64::new(cfg.target.as_nanos() as u64),
            status: Mutex::new(ThrottleStatus {
                share: 1.0,
                min_share: 1.0,
                target_ms: ms(cfg.target),
                setpoint_ms: ms(cfg.target) * cfg.setpoint_fraction,
                actuator: kind,
                ..Default::default()
            }),
        });
        let i2 = Arc::clone(&inner);
        let thread = std::thread::Builder::new()
            .name("ftvm-throttle".into())
            .spawn(move || control_loop(&cfg, &source, actuator.as_mut(), &i2));
        let thread = match thread {
            Ok(t) => t,
            Err(e) => {
                inner.cap.obeyed.fetch_sub(1, Ordering::AcqRel);
                return Err(ThrottleError::Spawn(e));
            }
        };
        tracing::info!(target: "ftvm::throttle", actuator = %describe, "throttle started");
        Ok(Throttle {
            inner,
            thread: Some(thread),
            actuator: describe,
            kind,
        })
    }

    /// The current state.
    pub fn status(&self) -> ThrottleStatus {
        *self.inner.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes the lag target (takes effect at the next update). In a pair, prefer
    /// [`propose_target`]: the change then goes through the log and the backup agrees on it.
    pub fn set_target(&self, target: Duration) {
        self.inner.set_target(target);
    }

    /// A [`TargetFollower`] that sets this throttle's target when a target control is applied
    /// (install it on the primary's `LogWriter::controls()`).
    pub fn follower(&self) -> TargetFollower {
        TargetFollower::for_throttle(Arc::clone(&self.inner))
    }

    /// The last target agreed through the log and applied to this throttle, and where.
    pub fn agreed_target(&self) -> Option<AgreedTarget> {
        *self.inner.agreed.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The lag target.
    pub fn target(&self) -> Duration {
        Duration::from_nanos(self.inner.target_ns.load(Ordering::Acquire))
    }

    /// What the throttle acts on (a description for logs).
    pub fn actuator(&self) -> &str {
        &self.actuator
    }

    /// The mechanism applying the share.
    pub fn kind(&self) -> ActuatorKind {
        self.kind
    }

    /// Stops the controller, restores full share and removes the cgroup; returns the final
    /// state.
    pub fn stop(mut self) -> ThrottleStatus {
        self.halt();
        self.status()
    }

    fn halt(&mut self) {
        self.inner.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            self.inner.cap.obeyed.fetch_sub(1, Ordering::AcqRel);
            if t.join().is_err() {
                tracing::error!(target: "ftvm::throttle", "the throttle thread panicked");
            }
        }
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        self.halt();
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn control_loop(
    cfg: &ThrottleConfig,
    source: &dyn LagSource,
    actuator: &mut dyn Actuator,
    inner: &Inner,
) {
    let mut meter = LagMeter::new(cfg.samples);
    let mut pi = PiController::new(cfg.pi);
    let mut applied = 1.0f64;
    let start = Instant::now();
    let mut last_update = start;
    let mut last_status = start;
    let mut errors_logged = 0u64;
    let mut cap = inner.cap.get();
    while !inner.stop.load(Ordering::Acquire) {
        let now = Instant::now();
        meter.sample(source.logged_seq(), source.logged_bytes(), now);
        let dt = now.saturating_duration_since(last_update);
        // A new bound is applied at once (a join waits for it before its cut).
        let cap_moved = inner.cap.get() != cap;
        if dt >= cfg.update_interval || cap_moved {
            cap = inner.cap.get();
            last_update = now;
            let target = Duration::from_nanos(inner.target_ns.load(Ordering::Acquire));
            let setpoint = target.as_secs_f64() * cfg.setpoint_fraction;
            let lag = meter.measure(source, now);
            // Alone (the backup failed): nothing to keep in step with, full speed — up to
            // the bound set from outside (a join's auto-converge).
            let share = if source.replicating() {
                pi.update(setpoint, lag.predicted.as_secs_f64(), dt.as_secs_f64())
            } else {
                1.0
            }
            .min(cap);
            // Writes to cgroupfs only when the quota would move by a visible amount.
            let changed = (share - applied).abs() > 0.005 || (share >= 1.0) != (applied >= 1.0);
            let mut failed = false;
            if changed {
                match actuator.set_share(share) {
                    Ok(()) => applied = share,
                    Err(e) => {
                        failed = true;
                        if errors_logged < 5 {
                            errors_logged += 1;
                            tracing::warn!(target: "ftvm::throttle", error = %error_text(&e), "cannot set the CPU share");
                        }
                    }
                }
            }
            inner
                .cap
                .applied_bits
                .store(applied.to_bits(), Ordering::Release);
            let mut s = inner.status.lock().unwrap_or_else(|e| e.into_inner());
            if s.share < 1.0 {
                s.throttled += dt;
            }
            s.share = applied;
            s.min_share = s.min_share.min(applied);
            s.target_ms = ms(target);
            s.setpoint_ms = setpoint * 1e3;
            s.lag_ms = ms(lag.time);
            s.lag_predicted_ms = ms(lag.predicted);
            s.backup_rate = lag.backup_rate.unwrap_or(0.0);
            s.lag_filtered_ms = pi.filtered_lag().unwrap_or(0.0) * 1e3;
            s.max_lag_ms = s.max_lag_ms.max(s.lag_ms);
            s.lag_entries = lag.entries;
            s.lag_bytes = lag.bytes;
            s.logged_seq = lag.logged_seq;
            s.executed_seq = lag.executed_seq;
            s.acked_seq = lag.acked_seq;
            s.updates += 1;
            s.actuator_errors += u64::from(failed);
            let status = *s;
            drop(s);
            if !cfg.status_interval.is_zero()
                && now.saturating_duration_since(last_status) >= cfg.status_interval
            {
                last_status = now;
                tracing::info!(
                    target: "ftvm::throttle",
                    share = format_args!("{:.3}", status.share),
                    lag_ms = format_args!("{:.1}", status.lag_filtered_ms),
                    target_ms = format_args!("{:.0}", status.target_ms),
                    lag_entries = status.lag_entries,
                    throttled_s = format_args!("{:.1}", status.throttled.as_secs_f64()),
                    "throttle"
                );
            }
        }
        std::thread::sleep(cfg.sample_interval);
    }
    if let Err(e) = actuator.set_share(1.0) {
        tracing::warn!(target: "ftvm::throttle", error = %error_text(&e), "cannot restore full share");
    }
    inner
        .cap
        .applied_bits
        .store(1.0f64.to_bits(), Ordering::Release);
    let mut s = inner.status.lock().unwrap_or_else(|e| e.into_inner());
    s.share = 1.0;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A simulated pair behind the real controller thread: the "primary" advances its
    /// position at `share × RATE` entries/s, the "backup" executes at `backup × RATE`.
    struct SimPair {
        logged: Arc<AtomicU64>,
        executed: Arc<AtomicU64>,
    }

    impl LagSource for SimPair {
        fn logged_seq(&self) -> u64 {
            self.logged.load(Ordering::Acquire)
        }
        fn logged_bytes(&self) -> Option<u64> {
            Some(self.logged_seq() * 40)
        }
        fn executed_seq(&self) -> u64 {
            self.executed.load(Ordering::Acquire)
        }
        fn acked_seq(&self) -> u64 {
            self.logged_seq()
        }
    }

    struct SimActuator(Arc<Mutex<f64>>);

    impl Actuator for SimActuator {
        fn set_share(&mut self, share: f64) -> Result<(), ThrottleError> {
            *self.0.lock().unwrap() = share;
            Ok(())
        }
        fn describe(&self) -> String {
            "simulation".into()
        }
    }

    #[test]
    fn the_controller_thread_throttles_a_simulated_pair() {
        // Bounds a time or a CPU share: one at a time with the other such tests.
        let _one = ftvm_testkit::one_at_a_time();
        const RATE: f64 = 20_000.0;
        let logged = Arc::new(AtomicU64::new(0));
        let executed = Arc::new(AtomicU64::new(0));
        let share = Arc::new(Mutex::new(1.0));
        let throttle = Throttle::with_actuator(
            ThrottleConfig {
                status_interval: Duration::ZERO,
                ..Default::default()
            },
            SimPair {
                logged: logged.clone(),
                executed: executed.clone(),
            },
            Box::new(SimActuator(share.clone())),
        )
        .expect("start");
        assert_eq!(throttle.actuator(), "simulation");
        let (mut p, mut b) = (0.0f64, 0.0f64);
        let mut backup_speed = 0.3;
        let t0 = Instant::now();
        let mut last = t0;
        let mut settled_lags = Vec::new();
        while t0.elapsed() < Duration::from_secs(6) {
            std::thread::sleep(Duration::from_millis(1));
            let now = Instant::now();
            let dt = now.duration_since(last).as_secs_f64();
            last = now;
            let u = *share.lock().unwrap();
            p += u * RATE * dt;
            b = (b + backup_speed * RATE * dt).min(p);
            logged.store(p as u64, Ordering::Release);
            executed.store(b as u64, Ordering::Release);
            let el = t0.elapsed();
            if el > Duration::from_secs(2) && el < Duration::from_secs(4) {
                settled_lags.push(throttle.status().lag_ms);
            }
            if el > Duration::from_secs(4) {
                backup_speed = 2.0;
            }
        }
        let s = throttle.status();
        assert_eq!(
            s.share, 1.0,
            "full share again after the backup caught up: {s:?}"
        );
        assert!(s.min_share < 0.5, "{s:?}");
        assert!(s.throttled > Duration::from_millis(500), "{s:?}");
        assert!(s.lag_bytes.is_some());
        settled_lags.sort_by(f64::total_cmp);
        let p99 = settled_lags[settled_lags.len() * 99 / 100];
        // Sleep jitter of the simulation loop adds noise; the controller keeps the lag under
        // the target with margin.
        assert!(p99 < 100.0, "p99 lag {p99:.1} ms while throttled");
        let fin = throttle.stop();
        assert_eq!(fin.share, 1.0);
        assert_eq!(*share.lock().unwrap(), 1.0);
    }

    #[test]
    fn set_target_reaches_the_status() {
        let share = Arc::new(Mutex::new(1.0));
        let t = Throttle::with_actuator(
            ThrottleConfig::default(),
            SimPair {
                logged: Arc::default(),
                executed: Arc::default(),
            },
            Box::new(SimActuator(share)),
        )
        .expect("start");
        t.set_target(Duration::from_millis(40));
        assert_eq!(t.target(), Duration::from_millis(40));
        let deadline = Instant::now() + Duration::from_secs(2);
        while t.status().target_ms != 40.0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let s = t.status();
        assert_eq!((s.target_ms, s.setpoint_ms), (40.0, 16.0));
        assert_eq!(s.share, 1.0, "no lag, no throttling");
    }

    #[test]
    fn bad_configurations_are_refused() {
        let cases = [
            ThrottleConfig {
                target: Duration::ZERO,
                ..Default::default()
            },
            ThrottleConfig {
                setpoint_fraction: 1.5,
                ..Default::default()
            },
            ThrottleConfig {
                pi: PiConfig {
                    min_share: 0.0,
                    ..Default::default()
                },
                ..Default::default()
            },
            ThrottleConfig {
                update_interval: Duration::from_micros(10),
                ..Default::default()
            },
        ];
        for cfg in cases {
            let r = Throttle::with_actuator(
                cfg,
                SimPair {
                    logged: Arc::default(),
                    executed: Arc::default(),
                },
                Box::new(SimActuator(Arc::default())),
            );
            assert!(matches!(r, Err(ThrottleError::Config(_))), "{r:?}");
        }
    }
}
