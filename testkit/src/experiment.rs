//! The throttle experiment: a primary and a backup in one process over TCP loopback, the
//! backup's vCPU thread limited by a cgroup on a schedule, the primary throttled, both sampled
//! over time. The scenario tests (`ft/tests/throttle.rs`) assert on its report; the
//! `throttle` benchmark plots it.
//!
//! The guest ([`logging_guest`]) logs at a steady rate: it does a fixed amount of arithmetic,
//! reads `CLOCK_NS` (one exit, one log entry), and repeats until its clock passes the run time,
//! so a run lasts the same wall time whatever the throttle does to its speed.
//!
//! Each [`Sample`] records, beside the pair's positions and shares, what the machine did to the
//! run: the hypervisor's steal and the time each vCPU thread waited on the run queue (and how
//! much of the backup's wait its own quota explains). The scenario tests excuse a timing
//! excursion only on that evidence: a backup that merely got less than its quota looks exactly
//! like a throttle that starves it. [`Sabotage`] breaks the controller or the backup on purpose,
//! so that the tests can show that their judgement catches each fault as a failure.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ftvm_channel::tcp::TcpMode;
use ftvm_channel::{Config, PollerConfig, TransportError};
use ftvm_ringbuf::IdleKind;

use crate::link::TcpLink;
use crate::{thread_schedstat, Asm};
use ftvm_ft::backup::{run_backup, BackupReport, LogReader};
use ftvm_ft::error::PairError;
use ftvm_ft::primary::{LogWriter, PairOptions, PrimaryReport};
use ftvm_ft::run::run_primary;
use ftvm_ft::share::Pacer;
use ftvm_ft::throttle::{
    current_tid, propose_target, Actuator, AgreedTarget, CgroupCpu, PairLag, PiConfig,
    TargetFollower, Throttle, ThrottleConfig, ThrottleError, ThrottleStatus,
};
use ftvm_vmm_core::devices::sys::{REG_CLOCK_NS, REG_POWER_OFF};
use ftvm_vmm_core::digest::pairing_digest;
use ftvm_vmm_core::error_chain as error_text;
use ftvm_vmm_core::error_chain;
use ftvm_vmm_core::vm::{buffer_console, Vm, VmConfig};

/// Guest RAM of the experiment's VMs.
pub const MEM_SIZE: u64 = 16 << 20;

/// Errors of an experiment run (a failed primary or backup run is part of the report).
#[derive(Debug, thiserror::Error)]
pub enum ExperimentError {
    /// A cgroup could not be set up.
    #[error("cgroup")]
    Cgroup(#[from] ThrottleError),
    /// The pair could not be set up.
    #[error("setup: {0}")]
    Setup(String),
    /// The channel could not be set up.
    #[error("channel")]
    Channel(#[from] TransportError),
    /// A thread panicked.
    #[error("the {0} thread panicked")]
    Panicked(&'static str),
}

/// A guest that logs one `CLOCK_NS` read after every `spin` iterations of integer arithmetic
/// (about 1 ns each) and powers off with 0 once its clock passes `run_for`.
pub fn logging_guest(run_for: Duration, spin: u32) -> Vec<u8> {
    let end = run_for.as_nanos().min(u64::MAX as u128) as u64;
    // rax = MMIO base (Asm::new), rsi = end, rbx = accumulator.
    let mut code = vec![0x48, 0xBE];
    code.extend_from_slice(&end.to_le_bytes()); // movabs rsi, end
    let outer = code.len();
    code.push(0xBA); // mov edx, spin
    code.extend_from_slice(&spin.max(1).to_le_bytes());
    let inner = code.len();
    code.extend_from_slice(&[0x48, 0x01, 0xD3]); // add rbx, rdx
    code.extend_from_slice(&[0x48, 0xC1, 0xC3, 0x07]); // rol rbx, 7
    code.extend_from_slice(&[0xFF, 0xCA]); // dec edx
    let rel = inner as i64 - (code.len() as i64 + 2);
    code.extend_from_slice(&[0x75, rel as i8 as u8]); // jnz inner
    code.extend_from_slice(&[0x48, 0x8B, 0x50, REG_CLOCK_NS as u8]); // mov rdx, [rax+CLOCK_NS]
    code.extend_from_slice(&[0x48, 0x31, 0xD3]); // xor rbx, rdx
    code.extend_from_slice(&[0x48, 0x39, 0xF2]); // cmp rdx, rsi
    let rel = outer as i64 - (code.len() as i64 + 6);
    code.extend_from_slice(&[0x0F, 0x82]); // jb outer (rel32)
    code.extend_from_slice(&(rel as i32).to_le_bytes());
    // mov qword [rax+POWER_OFF], 0; then spin in place.
    code.extend_from_slice(&[0x48, 0xC7, 0x40, REG_POWER_OFF as u8, 0, 0, 0, 0]);
    code.extend_from_slice(&[0xEB, 0xFE]);
    Asm::new().raw(&code).elf()
}

/// The actuator of a run without throttling: the controller runs (so the lag is measured the
/// same way) but nothing is applied.
struct Observe;

impl Actuator for Observe {
    fn set_share(&mut self, _share: f64) -> Result<(), ThrottleError> {
        Ok(())
    }
    fn describe(&self) -> String {
        "none (measuring only)".into()
    }
}

/// What happens when, counted from the start of the primary's run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Event {
    /// Limit the backup vCPU thread to this share of a CPU (1.0: no limit).
    BackupShare(f64),
    /// Withhold (`true`) or deliver again (`false`) the backup's acks.
    StallAcks(bool),
    /// Propose a new throttle target through the log ([`propose_target`]).
    ProposeTarget(Duration),
}

/// A fault put into a run on purpose (for tests only): the scenario tests run each and check
/// that their judgement of the run reports a failure, not a disturbance of the machine.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sabotage {
    /// The controller's gains (`pi.kp`, `pi.ki`) multiplied by this factor (0.2: a sluggish
    /// controller).
    Gain(f64),
    /// The primary never runs faster than this share, whatever the controller sets (0.6: a
    /// throttle that never gives full speed back). A pacer of its own, installed before the
    /// throttle's, holds the vCPU to `min(controller's share, ceiling)`; the samples still
    /// show the controller's share, so only the measured speed gives it away.
    ShareCeiling(f64),
    /// The backup's cgroup gets this fraction of the share the schedule gives it, while the
    /// samples report the scheduled share (1/3 of 0.3: a backup starved to 10 %, as one that
    /// wakes late or is throttled by mistake would be).
    StarveBackup(f64),
}

/// Parameters of a run.
#[derive(Debug, Clone)]
pub struct ExperimentConfig {
    /// How long the guest runs (its clock).
    pub run_for: Duration,
    /// Arithmetic iterations between two logged clock reads.
    pub spin: u32,
    /// Log buffer capacity of each side (a power of two).
    pub ring_capacity: usize,
    /// The primary's throttle (`None`: none; the lag is still measured).
    pub throttle: Option<ThrottleConfig>,
    /// The backup's CPU share before the first event.
    pub backup_share: f64,
    /// CFS period of the backup's cgroup.
    pub backup_period: Duration,
    /// `cpu.shares` of the backup's cgroup, and of the primary's unless its throttle
    /// configuration sets one: on a shared machine, a high weight stands for hosts that are
    /// otherwise idle (the vCPUs are not starved by unrelated work), so the cgroup quota alone
    /// decides how fast the backup is.
    pub backup_weight: u64,
    /// Events at times from the start of the primary's run.
    pub events: Vec<(Duration, Event)>,
    /// Sampling period of the report.
    pub sample_every: Duration,
    /// Exits between two digest checkpoints.
    pub digest_interval: u64,
    /// The channel's peer timeout (failure detection).
    pub peer_timeout: Duration,
    /// How long the end of the primary's run waits for acknowledgements.
    pub ack_timeout: Duration,
    /// A fault put in on purpose (tests only; `None` in every real run).
    pub sabotage: Option<Sabotage>,
}

impl Default for ExperimentConfig {
    fn default() -> Self {
        ExperimentConfig {
            run_for: Duration::from_secs(5),
            spin: 20_000,
            ring_capacity: 1 << 20,
            throttle: Some(ThrottleConfig::default()),
            backup_share: 1.0,
            backup_period: Duration::from_millis(10),
            backup_weight: 16_384,
            events: Vec::new(),
            sample_every: Duration::from_millis(50),
            digest_interval: 2000,
            peer_timeout: Duration::from_secs(5),
            ack_timeout: Duration::from_secs(20),
            sabotage: None,
        }
    }
}

/// One sample of a run.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Sample {
    /// Seconds since the primary's run started.
    pub t: f64,
    /// The primary's share as set by the throttle (1 without one).
    pub share: f64,
    /// CPU the primary's vCPU thread used since the previous sample (fraction of a CPU).
    pub primary_cpu: f64,
    /// CPU the backup's vCPU thread used since the previous sample.
    pub backup_cpu: f64,
    /// The backup's cgroup limit (1: none).
    pub backup_share: f64,
    /// The time lag (ms).
    pub lag_ms: f64,
    /// The throttle's predicted lag (ms).
    pub predicted_ms: f64,
    /// Last logged sequence number.
    pub logged: u64,
    /// Last acknowledged sequence number.
    pub acked: u64,
    /// Last executed sequence number.
    pub executed: u64,
    /// Log bytes written so far.
    pub log_bytes: u64,
    /// Times the vCPU waited for log space so far.
    pub stalls: u64,
    /// Time the vCPU waited for log space so far (s).
    pub stall_s: f64,
    /// Whether acks are being withheld.
    pub acks_stalled: bool,
    /// The throttle's target (ms).
    pub target_ms: f64,
    /// CPU time the hypervisor gave to others since the previous sample, summed over this
    /// machine's CPUs (fraction of a CPU; `steal` of `/proc/stat`): on a virtual machine, the
    /// time none of this run's threads could run however the controller set the shares.
    pub host_steal: f64,
    /// Time the primary's vCPU thread waited on a run queue since the previous sample
    /// (fraction of the interval; `/proc/<tid>/schedstat`), waiting out its own quota
    /// included: ready to run, not running.
    pub primary_wait: f64,
    /// The same for the backup's vCPU thread.
    pub backup_wait: f64,
    /// Time the backup's cgroup spent throttled by its quota since the previous sample
    /// (fraction of the interval; `throttled_time` of its `cpu.stat`): the part of
    /// `backup_wait` its own quota explains. The rest was other work on the machine.
    pub backup_throttled: f64,
}

impl Sample {
    /// Fraction of the interval the backup waited for a CPU that other work on this machine
    /// (or the hypervisor) had, not its own quota: run-queue wait beyond its throttled time,
    /// plus its part of the host's steal.
    pub fn backup_held(&self) -> f64 {
        (self.backup_wait - self.backup_throttled).max(0.0) + self.steal_per_cpu()
    }

    /// Fraction of the interval the primary waited for a CPU while it had no quota (share 1),
    /// plus its part of the host's steal; with a quota its wait is mostly its own doing and
    /// only the steal counts.
    pub fn primary_held(&self) -> f64 {
        let wait = if self.share >= 1.0 {
            self.primary_wait
        } else {
            0.0
        };
        wait + self.steal_per_cpu()
    }

    /// The host's steal spread over this machine's CPUs (one vCPU thread runs on one of them).
    fn steal_per_cpu(&self) -> f64 {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        self.host_steal / cpus as f64
    }
}

/// What a run did.
#[derive(Debug)]
pub struct ExperimentReport {
    /// Samples, every `sample_every`.
    pub samples: Vec<Sample>,
    /// The primary's run.
    pub primary: Result<PrimaryReport, PairError>,
    /// The backup's run.
    pub backup: Result<BackupReport, PairError>,
    /// The throttle's final state (without a throttle: the measuring controller's, whose
    /// `share` was never applied).
    pub throttle: Option<ThrottleStatus>,
    /// The log buffer capacity of the primary (bytes).
    pub ring_capacity: usize,
    /// The last throttle target the primary applied from the log, and where.
    pub primary_target: Option<AgreedTarget>,
    /// The last throttle target the backup applied from the log, and where.
    pub backup_target: Option<AgreedTarget>,
}

/// CPU time and run-queue wait of thread `tid` so far, in seconds (zeros before it exists).
fn sched_of(tid: i32) -> (f64, f64) {
    if tid <= 0 {
        return (0.0, 0.0);
    }
    thread_schedstat(tid).map_or((0.0, 0.0), |s| {
        (s.cpu.as_secs_f64(), s.run_queue_wait.as_secs_f64())
    })
}

/// Seconds of CPU time the hypervisor gave to others since boot, summed over this machine's
/// CPUs (the `steal` column of `/proc/stat`'s `cpu` line), if the kernel reports it.
fn host_steal_s() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    // cpu user nice system idle iowait irq softirq steal ...
    let ticks: u64 = line.split_whitespace().nth(8)?.parse().ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| ticks as f64 / hz as f64)
}

fn group_name(role: &str) -> String {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    format!(
        "ftvm-{}-exp-{role}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs the experiment (the primary on the calling thread).
///
/// # Errors
/// [`ExperimentError`] when the pair cannot be set up.
pub fn run(cfg: &ExperimentConfig) -> Result<ExperimentReport, ExperimentError> {
    let elf = logging_guest(cfg.run_for, cfg.spin);
    let digest = pairing_digest(&elf, "", MEM_SIZE, None)
        .map_err(|e| ExperimentError::Setup(format!("pairing digest: {e}")))?;
    let chan = Config {
        digest,
        peer_timeout: cfg.peer_timeout,
        ..Config::default()
    };
    let pc = PollerConfig {
        core: None,
        idle: IdleKind::Park,
    };
    let (backup_end, primary_end) = TcpLink::new()
        .ring(cfg.ring_capacity)
        .mode(TcpMode::Blocking)
        .poller(pc)
        .connect()?;

    // The backup's cgroup exists from the start; its share follows the events (a starved
    // backup gets a fraction of it).
    let starve = match cfg.sabotage {
        Some(Sabotage::StarveBackup(f)) => f,
        _ => 1.0,
    };
    let backup_quota = |share: f64| if share >= 1.0 { share } else { share * starve };
    let mut limit = CgroupCpu::create(&group_name("backup"), cfg.backup_period)?;
    limit.set_share(backup_quota(cfg.backup_share))?;
    limit.set_weight(cfg.backup_weight)?;
    let limit = Arc::new(Mutex::new(limit));
    let backup_tid = Arc::new(AtomicI32::new(0));
    let backup_follower = TargetFollower::new();
    let vm_config = || VmConfig {
        mem_size: MEM_SIZE,
        console: buffer_console().0,
        ..Default::default()
    };
    let backup = {
        let (elf, chan, limit, backup_tid, follower) = (
            elf.clone(),
            chan.clone(),
            Arc::clone(&limit),
            Arc::clone(&backup_tid),
            backup_follower.clone(),
        );
        let cfg_vm = vm_config();
        std::thread::Builder::new()
            .name("ftvm-exp-backup".into())
            .spawn(move || -> Result<BackupReport, PairError> {
                let mut vm = Vm::new(&cfg_vm, &elf)?;
                let tid = current_tid();
                limit
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .add_thread(tid)
                    .map_err(|e| PairError::Setup(ftvm_ft::error::SetupError::Throttle(e)))?;
                backup_tid.store(tid, Ordering::Release);
                let rx = backup_end.start(chan)?;
                // Park when caught up: a spinning backup would take the primary's CPU.
                let reader = LogReader::new(rx, IdleKind::Park, None);
                follower.install(reader.controls());
                run_backup(&mut vm, reader)
            })
            .map_err(|e| ExperimentError::Setup(format!("backup thread: {e}")))?
    };

    let mut vm = Vm::new(&vm_config(), &elf)
        .map_err(|e| ExperimentError::Setup(format!("primary VM: {}", error_chain(&e))))?;
    let stall = Arc::new(AtomicBool::new(false));
    let sender = primary_end.stall_acks(Arc::clone(&stall)).start(chan)?;
    let writer = LogWriter::new(sender, IdleKind::Yield);
    let shared = Arc::clone(writer.sender().shared());
    let primary_tid = current_tid();
    let mut primary_group = None;
    let throttling = cfg.throttle.is_some();
    // A ceiling on the primary's speed: the writer consults only the first pacer set, so this
    // one, set before the throttle's, is the one that paces the vCPU.
    let ceiling = match cfg.sabotage {
        Some(Sabotage::ShareCeiling(c)) => {
            let pacer = Arc::new(Pacer::default());
            pacer.set_share(c);
            writer.set_pacer(Arc::clone(&pacer));
            Some((pacer, c))
        }
        _ => None,
    };
    let gain = match cfg.sabotage {
        Some(Sabotage::Gain(g)) => g,
        _ => 1.0,
    };
    let throttle = match &cfg.throttle {
        Some(tc) => Throttle::for_writer(
            ThrottleConfig {
                pi: PiConfig {
                    kp: tc.pi.kp * gain,
                    ki: tc.pi.ki * gain,
                    ..tc.pi
                },
                group_name: Some(
                    tc.group_name
                        .clone()
                        .unwrap_or_else(|| group_name("primary")),
                ),
                cpu_weight: tc.cpu_weight.or(Some(cfg.backup_weight)),
                ..tc.clone()
            },
            &writer,
            primary_tid,
        )?,
        None => {
            // The same weight as a throttled primary, without a quota.
            let mut g = CgroupCpu::create(&group_name("primary"), Duration::from_millis(10))?;
            g.set_weight(cfg.backup_weight)?;
            g.add_thread(primary_tid)?;
            primary_group = Some(g);
            Throttle::with_actuator(
                ThrottleConfig {
                    status_interval: Duration::ZERO,
                    ..Default::default()
                },
                PairLag::new(Arc::clone(&shared), Arc::clone(writer.position())),
                Box::new(Observe),
            )?
        }
    };
    // With a throttle, `for_writer` installed its follower; without one, record only.
    let primary_follower = if throttling {
        throttle.follower()
    } else {
        let f = TargetFollower::new();
        f.install(writer.controls());
        f
    };
    let opts = PairOptions {
        digest_interval: cfg.digest_interval,
        mem_digest_every: 0,
        idle: IdleKind::Yield,
        ack_timeout: cfg.ack_timeout,
        ..PairOptions::default()
    };
    let done = AtomicBool::new(false);
    let (primary, samples) = std::thread::scope(|s| {
        let monitor = std::thread::Builder::new()
            .name("ftvm-exp-monitor".into())
            .spawn_scoped(s, || {
                let start = Instant::now();
                let mut events = cfg.events.clone();
                events.sort_by_key(|(t, _)| *t);
                let mut next_event = 0;
                let mut samples = Vec::new();
                let mut backup_share = cfg.backup_share;
                let throttled_s = || {
                    let g = limit.lock().unwrap_or_else(|e| e.into_inner());
                    g.stat().map_or(0.0, |(_, _, t)| t.as_secs_f64())
                };
                let (mut p0, mut b0, mut t0) = (sched_of(primary_tid), (0.0, 0.0), 0.0);
                let (mut steal0, mut thr0) = (host_steal_s().unwrap_or(0.0), throttled_s());
                while !done.load(Ordering::Acquire) {
                    std::thread::sleep(cfg.sample_every);
                    let t = start.elapsed();
                    while let Some((at, ev)) = events.get(next_event) {
                        if *at > t {
                            break;
                        }
                        match *ev {
                            Event::BackupShare(share) => {
                                backup_share = share;
                                let r = limit
                                    .lock()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .set_share(backup_quota(share));
                                if let Err(e) = r {
                                    tracing::warn!(error = %error_text(&e), "backup share");
                                }
                            }
                            Event::StallAcks(on) => stall.store(on, Ordering::Release),
                            Event::ProposeTarget(d) => propose_target(writer.controls(), d),
                        }
                        next_event += 1;
                    }
                    let ts = t.as_secs_f64();
                    let (p1, b1) = (
                        sched_of(primary_tid),
                        sched_of(backup_tid.load(Ordering::Acquire)),
                    );
                    let dt = (ts - t0).max(1e-6);
                    let (steal, thr) = (host_steal_s().unwrap_or(0.0), throttled_s());
                    // The backup's thread exists from its first sample on.
                    let since = |now: f64, then: f64| {
                        if b0.0 > 0.0 {
                            (now - then).max(0.0) / dt
                        } else {
                            0.0
                        }
                    };
                    let st = throttle.status();
                    let stalls = writer.stalls();
                    // The backup's positions first, the log's after: read the other way round,
                    // entries logged and acknowledged between the two loads made a sample's
                    // `acked` exceed its `logged` (one CI run saw `logged - acked` wrap).
                    let executed = shared.executed_seq();
                    let acked = shared.acked_seq();
                    let logged = writer.position().load(Ordering::Acquire);
                    samples.push(Sample {
                        t: ts,
                        share: if throttling { st.share } else { 1.0 },
                        primary_cpu: (p1.0 - p0.0) / dt,
                        backup_cpu: since(b1.0, b0.0),
                        backup_share,
                        lag_ms: st.lag_ms,
                        predicted_ms: st.lag_predicted_ms,
                        logged,
                        acked,
                        executed,
                        log_bytes: writer.bytes(),
                        stalls: stalls.count,
                        stall_s: stalls.time.as_secs_f64(),
                        acks_stalled: stall.load(Ordering::Acquire),
                        target_ms: st.target_ms,
                        host_steal: (steal - steal0).max(0.0) / dt,
                        primary_wait: (p1.1 - p0.1).max(0.0) / dt,
                        backup_wait: since(b1.1, b0.1),
                        backup_throttled: since(thr, thr0),
                    });
                    (p0, b0, t0, steal0, thr0) = (p1, b1, ts, steal, thr);
                }
                samples
            });
        if let Some((pacer, c)) = &ceiling {
            // The sabotaged pacer follows the controller, never above the ceiling.
            s.spawn(|| {
                while !done.load(Ordering::Acquire) {
                    pacer.set_share(throttle.status().share.min(*c));
                    std::thread::sleep(Duration::from_millis(1));
                }
            });
        }
        let primary = run_primary(&mut vm, &writer, &opts, None, &Default::default());
        done.store(true, Ordering::Release);
        stall.store(false, Ordering::Release);
        let samples = match monitor {
            Ok(h) => h.join().map_err(|_| ExperimentError::Panicked("monitor")),
            Err(e) => Err(ExperimentError::Setup(format!("monitor thread: {e}"))),
        };
        (primary, samples)
    });
    let samples = samples?;
    let throttle = Some(throttle.stop());
    drop(primary_group);
    // Hang up: the backup lingers until the primary's side of the link closes.
    drop(writer);
    drop(vm);
    let backup = backup
        .join()
        .map_err(|_| ExperimentError::Panicked("backup"))?;
    Ok(ExperimentReport {
        samples,
        primary,
        backup,
        throttle,
        ring_capacity: cfg.ring_capacity,
        primary_target: primary_follower.agreed(),
        backup_target: backup_follower.agreed(),
    })
}

/// The `q` quantile (0..=1) of `values` (0 when empty).
pub fn quantile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let i = ((v.len() - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize;
    v[i.min(v.len() - 1)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles() {
        assert_eq!(quantile(&[], 0.5), 0.0);
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.0), 1.0);
        assert_eq!(quantile(&v, 1.0), 100.0);
        assert_eq!(quantile(&v, 0.99), 99.0);
    }
}
