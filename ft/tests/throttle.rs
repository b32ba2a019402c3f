//! Flow control and throttling with real KVM VMs, a real log channel (TCP loopback) and real
//! cgroups: a backup whose vCPU thread is limited to 30 % of a CPU throttles the primary and
//! the lag stays at its set point and under the target; lifting the limit restores full speed;
//! a backup that stops acknowledging stalls the primary with bounded memory, and the log
//! arrives whole.
//!
//! # Judging a run's timing
//!
//! This machine is shared, so a timing check may fail because the host took the CPU. A run is
//! excused (run again, at most 3 times, then a loud SKIP that CI counts) only on evidence from
//! the samples that the host did it: the hypervisor's steal, or a vCPU thread waiting on the
//! run queue for other work (its own quota's throttling does not count). A backup that merely
//! used less than its quota is no excuse: that is what a throttle that starves the backup, or
//! a backup that wakes late, looks like. After the lift the primary must run as fast as the
//! unlimited backup allows in the same run: its measured CPU at least 85 % of what it could
//! have had (not the controller's own share, nor the backup's use, which follows the primary's
//! speed), or else the lag at the set point, the backup setting the pace.
//! Three deliberately broken variants ([`Sabotage`]) show that the judgement reports each as a
//! failure.
//!
//! The tests take the machine's two cores for themselves: they run one at a time.

use std::time::Duration;

use ftvm_ft::error::PairError;
use ftvm_ft::throttle::{cgroup_cpu_unusable, ThrottleConfig};
use ftvm_testkit::experiment::{
    self, quantile, Event, ExperimentConfig, ExperimentReport, Sabotage, Sample,
};
use ftvm_testkit::{kvm_missing, one_at_a_time, skip};

/// Prints `SKIP <test>: <reason>` and returns when KVM or the cgroup cpu controller is missing.
macro_rules! require_kvm_and_cgroup {
    ($name:expr) => {
        if skip::if_missing($name, kvm_missing().or_else(cgroup_cpu_unusable)) {
            return;
        }
    };
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

/// The backup replayed the whole log: same exits, same final memory and registers.
fn assert_replayed(r: &ExperimentReport) {
    let p = r.primary.as_ref().expect("primary run");
    let b = r.backup.as_ref().expect("backup run");
    assert_eq!(p.code, 0);
    assert_eq!((b.code, b.exits), (p.code, p.exits), "exits differ");
    assert_eq!(b.mem_digest, p.mem_digest, "memory differs");
    assert_eq!(b.regs_digest, p.regs_digest, "registers differ");
    assert_eq!(b.entries, p.entries, "entries lost or added");
    assert!(p.backup_finished);
}

fn window(samples: &[Sample], from: f64, to: f64) -> Vec<&Sample> {
    samples.iter().filter(|s| s.t >= from && s.t < to).collect()
}

/// The most entries logged and not yet acknowledged at any sample.
fn max_in_flight(samples: &[Sample]) -> u64 {
    samples
        .iter()
        .map(|x| x.logged.saturating_sub(x.acked))
        .max()
        .unwrap_or(0)
}

fn rate(w: &[&Sample]) -> f64 {
    match (w.first(), w.last()) {
        (Some(a), Some(b)) if b.t > a.t => (b.logged - a.logged) as f64 / (b.t - a.t),
        _ => 0.0,
    }
}

fn mean(w: &[&Sample], f: impl Fn(&Sample) -> f64) -> f64 {
    w.iter().map(|s| f(s)).sum::<f64>() / w.len().max(1) as f64
}

fn print_samples(r: &ExperimentReport) {
    for (i, s) in r.samples.iter().enumerate() {
        if i % 10 != 0 && s.lag_ms < 100.0 {
            continue;
        }
        eprintln!(
            "t={:5.2} share={:.2} cpu p={:.2} b={:.2} (limit {:.2}) wait p={:.2} b={:.2} (quota {:.2}) steal={:.2} lag={:6.1} ms pred={:6.1} ms entries={} inflight={} stalls={}",
            s.t,
            s.share,
            s.primary_cpu,
            s.backup_cpu,
            s.backup_share,
            s.primary_wait,
            s.backup_wait,
            s.backup_throttled,
            s.host_steal,
            s.lag_ms,
            s.predicted_ms,
            s.logged.saturating_sub(s.executed),
            s.logged.saturating_sub(s.acked),
            s.stalls,
        );
    }
}

/// What a run's timing says about the controller.
#[derive(Debug, Clone, PartialEq)]
enum Verdict {
    /// Every check held.
    Pass,
    /// A check failed and the samples show that the host took the CPU that explains it (and
    /// no check failed without such evidence): the run says nothing, run again.
    Disturbed(String),
    /// A check failed without such evidence: a fault of the controller or of the pair.
    Fail(String),
}

/// The findings of one run's checks, folded into a [`Verdict`]: any failure without evidence
/// makes the run a failure, however many others the host explains.
#[derive(Debug, Default)]
struct Findings {
    failed: Vec<String>,
    excused: Vec<String>,
}

impl Findings {
    /// Records a check: nothing when `ok`; else an excused finding when `evidence` names
    /// what the host did, a failure otherwise.
    fn check(&mut self, ok: bool, what: impl FnOnce() -> String, evidence: Option<String>) {
        if ok {
            return;
        }
        match evidence {
            Some(e) => self.excused.push(format!("{}; {e}", what())),
            None => self.failed.push(what()),
        }
    }

    fn verdict(self) -> Verdict {
        if !self.failed.is_empty() {
            Verdict::Fail(self.failed.join("\n"))
        } else if !self.excused.is_empty() {
            Verdict::Disturbed(self.excused.join("\n"))
        } else {
            Verdict::Pass
        }
    }
}

/// Evidence that the host held the backup up over `w`: on average at least `needed` of a CPU
/// went to other work or to the hypervisor while the backup was ready to run.
fn backup_held(w: &[&Sample], needed: f64) -> Option<String> {
    let held = mean(w, Sample::backup_held);
    (held >= needed).then(|| {
        format!(
            "the host held the backup up: it waited {held:.2} of a CPU (beyond its quota's throttling, with steal {:.2}) against {needed:.2} needed to explain it",
            mean(w, |s| s.host_steal)
        )
    })
}

/// Intervals before a sample that a lag spike at it can come from: the lag rises while the
/// backup is held up and falls back over a few hundred milliseconds.
const LOOKBACK: usize = 6;

/// Why the lag at sample `i` is the host's doing, if the samples show it: in the [`LOOKBACK`]
/// intervals before it, the host took from the backup (run-queue wait beyond its quota's
/// throttling, steal) at least half the CPU time that the excursion over the set point costs
/// a backup limited to `quota` (losing `x` ms of CPU at quota `q` delays it by `x / q` ms).
fn spike_explained(s: &[Sample], i: usize, setpoint_ms: f64, quota: f64) -> Option<String> {
    let from = i.saturating_sub(LOOKBACK).max(1);
    let lost_ms: f64 = (from..=i)
        .map(|j| s[j].backup_held() * (s[j].t - s[j - 1].t) * 1e3)
        .sum();
    let needed_ms = 0.5 * (s[i].lag_ms - setpoint_ms).max(0.0) * quota;
    (lost_ms >= needed_ms).then(|| {
        format!(
            "the host took {lost_ms:.0} ms of CPU from the backup in the {:.0} ms before t={:.2} s (lag {:.0} ms needs {needed_ms:.0})",
            (s[i].t - s[from - 1].t) * 1e3,
            s[i].t,
            s[i].lag_ms
        )
    })
}

/// The `q` quantile of the lag over samples `from..to` against `bound` (ms): `ok`, and when
/// it is not, the evidence for every sample over the bound (`None` when one has none).
fn lag_quantile_judged(
    s: &[Sample],
    (from, to): (f64, f64),
    q: f64,
    bound: f64,
    setpoint_ms: f64,
    quota: f64,
) -> (f64, Option<String>) {
    let idx: Vec<usize> = (1..s.len())
        .filter(|&i| s[i].t >= from && s[i].t < to)
        .collect();
    let lags: Vec<f64> = idx.iter().map(|&i| s[i].lag_ms).collect();
    let value = quantile(&lags, q);
    if value <= bound {
        return (value, None);
    }
    let why: Option<Vec<String>> = idx
        .iter()
        .filter(|&&i| s[i].lag_ms > bound)
        .map(|&i| spike_explained(s, i, setpoint_ms, quota))
        .collect();
    let why = why.map(|w| {
        format!(
            "{} samples over {bound:.0} ms, each explained; first: {}",
            w.len(),
            w[0]
        )
    });
    (value, why)
}

/// Checks that the median lag over `w` sits at the controller's set point (within 0.5–1.5 ×
/// `setpoint` ms) and returns it: below, the primary was held back for nothing (an
/// over-throttling or sluggish controller); above, the backup fell behind, which the host
/// excuses only when it held the backup (limited to `quota`) up.
fn lag_at_set_point(f: &mut Findings, w: &[&Sample], setpoint: f64, quota: f64) -> f64 {
    let lags: Vec<f64> = w.iter().map(|x| x.lag_ms).collect();
    let p50 = quantile(&lags, 0.5);
    f.check(
        p50 >= 0.5 * setpoint,
        || format!("lag p50 {p50:.1} ms, under half the set point {setpoint:.0} ms: held back for nothing"),
        None,
    );
    f.check(
        p50 <= 1.5 * setpoint,
        || format!("lag p50 {p50:.1} ms, over 1.5 × the set point {setpoint:.0} ms"),
        backup_held(w, 0.25 * quota),
    );
    p50
}

/// The schedule of a slowed-backup run and what its judgement expects.
#[derive(Debug, Clone, Copy)]
struct Plan {
    /// The backup is limited to `quota` at `slow_at` s, unlimited again at `lift_at` s; the
    /// run ends at `end` s.
    slow_at: f64,
    lift_at: f64,
    end: f64,
    quota: f64,
    target: Duration,
}

/// The controller regulates the lag to this fraction of the target (its default).
const SETPOINT_FRACTION: f64 = 0.4;

/// Tolerance of the settled lag: p99 of the samples taken after the controller settled must
/// stay within `TOLERANCE × target`.
const TOLERANCE: f64 = 1.2;

/// The largest lag while the controller reacts to the slow-down (its first 3 s), in targets.
const TRANSIENT: f64 = 5.0;

/// How long the controller may take to give the share back after the lift (from a 0.3 share
/// its integral needs about 1.5 s; idle runs reach full share in 0.8-1.8 s).
const RECOVER_WITHIN: f64 = 2.5;

impl Plan {
    fn config(&self) -> ExperimentConfig {
        ExperimentConfig {
            run_for: secs(self.end),
            throttle: Some(ThrottleConfig {
                target: self.target,
                ..Default::default()
            }),
            events: vec![
                (secs(self.slow_at), Event::BackupShare(self.quota)),
                (secs(self.lift_at), Event::BackupShare(1.0)),
            ],
            ..Default::default()
        }
    }

    fn target_ms(&self) -> f64 {
        self.target.as_secs_f64() * 1e3
    }

    fn setpoint_ms(&self) -> f64 {
        self.target_ms() * SETPOINT_FRACTION
    }

    /// The timing checks of a slowed-backup run.
    fn judge(&self, r: &ExperimentReport) -> Verdict {
        let s = &r.samples;
        let mut f = Findings::default();
        let (setpoint, quota) = (self.setpoint_ms(), self.quota);
        let settled = window(s, self.slow_at + 3.0, self.lift_at);
        let slowed = window(s, self.slow_at + 0.5, self.lift_at);

        // The primary was throttled (a slowed backup needs it; no host excuses its absence).
        let min_share = s.iter().map(|x| x.share).fold(1.0, f64::min);
        let mean_share = mean(&settled, |x| x.share);
        f.check(
            min_share < 0.7 && mean_share < 0.8,
            || {
                format!(
                    "not throttled: min share {min_share:.2}, mean while slowed {mean_share:.2}"
                )
            },
            None,
        );

        // The backup got its quota whenever it was behind (a lag of half the set point or
        // more): less, and it was starved or woke late, unless the host took the difference.
        let behind: Vec<&Sample> = slowed
            .iter()
            .copied()
            .filter(|x| x.lag_ms >= 0.5 * setpoint)
            .collect();
        let used = mean(&behind, |x| x.backup_cpu);
        f.check(
            behind.len() < 10 || used >= 0.7 * quota,
            || format!("the backup used {used:.2} of a CPU under a {quota:.2} quota while behind ({} samples)", behind.len()),
            backup_held(&behind, 0.5 * (quota - used)),
        );

        let p50 = lag_at_set_point(&mut f, &settled, setpoint, quota);

        // Settled p99 under the tolerance; each sample over it needs its own evidence.
        let bound = self.target_ms() * TOLERANCE;
        let (p99, why) = lag_quantile_judged(
            s,
            (self.slow_at + 3.0, self.lift_at),
            0.99,
            bound,
            setpoint,
            quota,
        );
        f.check(
            p99 <= bound,
            || format!("settled lag p99 {p99:.1} ms over {TOLERANCE} × target"),
            why,
        );

        // The reaction to the slow-down stays within TRANSIENT targets.
        let transient = self.target_ms() * TRANSIENT;
        let (peak, why) = lag_quantile_judged(
            s,
            (self.slow_at, self.slow_at + 3.0),
            1.0,
            transient,
            setpoint,
            quota,
        );
        f.check(
            peak <= transient,
            || format!("lag peaked at {peak:.0} ms after the slow-down, over {TRANSIENT} × target"),
            why,
        );

        // After the lift, once the controller had RECOVER_WITHIN to give the share back, the
        // primary runs as fast as the now unlimited backup allows: at full speed (its measured
        // CPU at least 85 % of what it could have had — what it did not wait for on the run
        // queue and the hypervisor did not steal; the controller's own share is not trusted),
        // or, where the machine leaves the backup too little to keep up with that, with the lag
        // at the set point (the backup sets the pace, as the controller should). Held back
        // while the backup idles — the lag far below the set point — is a fault whatever the
        // host did: a slow host raises the lag, it does not lower it.
        let after = window(s, self.lift_at + RECOVER_WITHIN, self.end - 0.2);
        let speed = mean(&after, |x| x.primary_cpu) / mean(&after, |x| 1.0 - x.primary_held());
        let lags: Vec<f64> = after.iter().map(|x| x.lag_ms).collect();
        let p50_after = quantile(&lags, 0.5);
        f.check(
            speed >= 0.85 || p50_after >= 0.5 * setpoint,
            || format!(
                "held back after the lift: the primary ran at {speed:.2} of the CPU it could have had (mean share {:.2}) while the backup kept up (lag p50 {p50_after:.1} ms, set point {setpoint:.0})",
                mean(&after, |x| x.share)
            ),
            None,
        );
        let (fast, slow) = (
            rate(&window(s, self.lift_at + 2.0, self.end - 0.2)),
            rate(&settled),
        );
        f.check(
            fast > 1.4 * slow,
            || format!("entries/s slowed {slow:.0}, after the lift {fast:.0}"),
            None,
        );
        eprintln!(
            "settled lag p50 {p50:.1} ms p99 {p99:.1} ms (set point {setpoint:.0}, target {:.0}); peak after the slow-down {peak:.0} ms; mean share {mean_share:.2}; backup used {used:.2} of {quota:.2} while behind; after the lift: speed {speed:.2} of the CPU it could have had, lag p50 {p50_after:.1} ms; entries/s slowed {slow:.0}, after {fast:.0}",
            self.target_ms()
        );
        f.verdict()
    }
}

/// The slowed-backup schedule: 0–1 s full speed, 1–9 s backup limited to 30 % of a CPU, 9–15
/// s unlimited again, target 100 ms.
const SLOWED: Plan = Plan {
    slow_at: 1.0,
    lift_at: 9.0,
    end: 15.0,
    quota: 0.3,
    target: Duration::from_millis(100),
};

/// The experiments' sampling period (their default).
const SAMPLE_EVERY: Duration = Duration::from_millis(50);

/// Runs `cfg` until `judge` finds the run's timing meaningful (at most 3 attempts: the machine
/// is shared): returns the last run and its verdict, printed.
fn run_judged(
    test: &str,
    cfg: &ExperimentConfig,
    judge: impl Fn(&ExperimentReport) -> Verdict,
) -> (ExperimentReport, Verdict) {
    assert_eq!(cfg.sample_every, SAMPLE_EVERY);
    let mut attempt = 1;
    loop {
        let r = experiment::run(cfg).expect("experiment");
        let verdict = judge(&r);
        eprintln!("{test}: attempt {attempt}: {verdict:?}");
        match verdict {
            Verdict::Disturbed(_) if attempt < 3 => {
                print_samples(&r);
                attempt += 1;
            }
            v => return (r, v),
        }
    }
}

/// A verdict of a real (unsabotaged) run: passes, fails the test, or skips its timing checks
/// loudly (counted by `scripts/test.sh`) after three disturbed runs.
fn expect_pass(test: &str, verdict: Verdict) {
    match verdict {
        Verdict::Pass => {}
        Verdict::Disturbed(why) => skip::skip(
            test,
            format_args!("timing not judged, the host disturbed 3 runs: {why}"),
        ),
        Verdict::Fail(why) => panic!("{test}: {why}"),
    }
}

#[test]
fn throttle_slowed_backup_keeps_lag_under_target_and_full_speed_returns() {
    const TEST: &str = "throttle_slowed_backup_keeps_lag_under_target_and_full_speed_returns";
    require_kvm_and_cgroup!(TEST);
    let _one = one_at_a_time();
    let (r, verdict) = run_judged(TEST, &SLOWED.config(), |r| SLOWED.judge(r));
    print_samples(&r);
    assert_replayed(&r);
    eprintln!("{TEST}: final throttle status {:?}", r.throttle);
    // The log buffer never filled: no stall, and never more than half the capacity in flight.
    let p = r.primary.as_ref().expect("primary");
    assert_eq!(p.log_stalls.count, 0, "the vCPU waited for log space");
    let bytes_per_entry = p.log_bytes as f64 / p.entries.max(1) as f64 + 16.0;
    let max_inflight = max_in_flight(&r.samples);
    assert!(
        (max_inflight as f64) * bytes_per_entry < r.ring_capacity as f64 / 2.0,
        "{max_inflight} entries in flight"
    );
    expect_pass(TEST, verdict);
}

/// Runs the slowed-backup schedule with `sabotage` and asserts that the judgement reports a
/// failure (a disturbed run is repeated; three end in a loud SKIP, as for a real run).
fn sabotage_is_caught(test: &str, sabotage: Sabotage) {
    let _one = one_at_a_time();
    let cfg = ExperimentConfig {
        sabotage: Some(sabotage),
        ..SLOWED.config()
    };
    let (r, verdict) = run_judged(test, &cfg, |r| SLOWED.judge(r));
    // The fault is in the timing only: the log still replays exactly.
    assert_replayed(&r);
    match verdict {
        Verdict::Fail(why) => eprintln!("{test}: {sabotage:?} caught: {why}"),
        Verdict::Disturbed(why) => skip::skip(
            test,
            format_args!("timing not judged, the host disturbed 3 runs: {why}"),
        ),
        Verdict::Pass => {
            print_samples(&r);
            panic!("{test}: {sabotage:?} passed the judgement");
        }
    }
}

#[test]
fn throttle_sabotage_sluggish_controller_is_caught() {
    const TEST: &str = "throttle_sabotage_sluggish_controller_is_caught";
    require_kvm_and_cgroup!(TEST);
    sabotage_is_caught(TEST, Sabotage::Gain(0.2));
}

#[test]
fn throttle_sabotage_share_stuck_at_0_6_is_caught() {
    const TEST: &str = "throttle_sabotage_share_stuck_at_0_6_is_caught";
    require_kvm_and_cgroup!(TEST);
    sabotage_is_caught(TEST, Sabotage::ShareCeiling(0.6));
}

#[test]
fn throttle_sabotage_backup_starved_to_10_percent_is_caught() {
    const TEST: &str = "throttle_sabotage_backup_starved_to_10_percent_is_caught";
    require_kvm_and_cgroup!(TEST);
    sabotage_is_caught(TEST, Sabotage::StarveBackup(1.0 / 3.0));
}

#[test]
fn throttle_backup_that_stops_acking_stalls_the_primary_with_bounded_memory() {
    const TEST: &str = "throttle_backup_that_stops_acking_stalls_the_primary_with_bounded_memory";
    require_kvm_and_cgroup!(TEST);
    let _one = one_at_a_time();
    // A small buffer (64 KiB ≈ 1600 entries) fills in well under the 2 s the acks are held.
    let capacity = 64 << 10;
    let (stall_at, release_at) = (1.0, 3.0);
    let r = experiment::run(&ExperimentConfig {
        run_for: secs(4.5),
        ring_capacity: capacity,
        throttle: None,
        events: vec![
            (secs(stall_at), Event::StallAcks(true)),
            (secs(release_at), Event::StallAcks(false)),
        ],
        ..Default::default()
    })
    .expect("experiment");
    print_samples(&r);
    // Nothing lost or reordered: the backup's final state equals the primary's.
    assert_replayed(&r);
    let p = r.primary.as_ref().expect("primary");
    let s = &r.samples;
    // The primary stalled: its position stood still while the acks were held...
    let held = window(s, stall_at + 0.5, release_at - 0.05);
    let (first, last) = (
        held.first().expect("samples"),
        held.last().expect("samples"),
    );
    assert_eq!(first.logged, last.logged, "the primary kept logging");
    // ...with at most a buffer's worth of entries unacknowledged (bounded memory)...
    let max_record = 24 + 16;
    let max_inflight = max_in_flight(s);
    assert!(
        max_inflight as usize * 16 <= capacity,
        "{max_inflight} entries in flight in a {capacity}-byte buffer"
    );
    assert!(
        max_inflight as usize * max_record >= capacity / 4,
        "the buffer never filled: {max_inflight} in flight"
    );
    // ...and the stall was counted.
    eprintln!("{TEST}: stalls {:?}", p.log_stalls);
    assert!(p.log_stalls.count >= 1);
    assert!(
        p.log_stalls.time >= Duration::from_millis(1200),
        "stall time {:?}",
        p.log_stalls.time
    );
    // After the release the primary went on.
    let tail = window(s, release_at + 0.3, 4.4);
    assert!(rate(&tail) > 0.0, "no progress after the release");
}

#[test]
fn throttle_backup_that_never_acks_ends_in_failure_detection() {
    const TEST: &str = "throttle_backup_that_never_acks_ends_in_failure_detection";
    require_kvm_and_cgroup!(TEST);
    let _one = one_at_a_time();
    let capacity = 64 << 10;
    let r = experiment::run(&ExperimentConfig {
        run_for: secs(20.0),
        ring_capacity: capacity,
        peer_timeout: Duration::from_secs(1),
        ack_timeout: Duration::from_secs(2),
        events: vec![(secs(0.5), Event::StallAcks(true))],
        ..Default::default()
    })
    .expect("experiment");
    // The primary stops with an error: its log is full and the link is declared down.
    match &r.primary {
        // (A `PairError::Log` carries its cause, typed: the sender's peer timeout.)
        Err(PairError::Log(why))
            if why
                .to_string()
                .contains("log buffer full and the link is down")
                && why.to_string().contains("nothing heard from the peer") =>
        {
            eprintln!("{TEST}: primary: {why}");
        }
        // A pair without an arbiter: the primary's link watch may stop it first, on the same
        // dead link (PairError::PeerFailed, the backup named as the failed peer).
        Err(e @ PairError::PeerFailed { peer, why, .. })
            if *peer == "backup" && why.to_string().contains("nothing heard from the peer") =>
        {
            eprintln!("{TEST}: primary: {e}");
        }
        other => panic!("expected a full log on a link that is down, got {other:?}"),
    }
    let last = r.samples.last().expect("samples");
    assert!(
        last.t < 5.0,
        "failure detection took {:.1} s (peer timeout 1 s)",
        last.t
    );
    let max_inflight = max_in_flight(&r.samples);
    assert!(
        max_inflight as usize * 16 <= capacity,
        "{max_inflight} in flight"
    );
    // The backup cannot finish a log that stopped: it says so, at an exit it reached.
    match &r.backup {
        Err(PairError::LogEnded { exit, why }) => {
            eprintln!("{TEST}: backup: log ended at exit {exit}: {why}");
            assert!(*exit > 0);
        }
        other => panic!("expected the backup's log to end, got {other:?}"),
    }
}

#[test]
fn throttle_target_change_is_agreed_through_the_log() {
    const TEST: &str = "throttle_target_change_is_agreed_through_the_log";
    require_kvm_and_cgroup!(TEST);
    let _one = one_at_a_time();
    // Backup limited to 30 % from 0.5 s; at 3.5 s the target drops from 100 ms to 50 ms.
    let (change_at, end) = (3.5, 7.5);
    let (old, new) = (Duration::from_millis(100), Duration::from_millis(50));
    let cfg = ExperimentConfig {
        run_for: secs(end),
        throttle: Some(ThrottleConfig {
            target: old,
            ..Default::default()
        }),
        events: vec![
            (secs(0.5), Event::BackupShare(0.3)),
            (secs(change_at), Event::ProposeTarget(new)),
        ],
        ..Default::default()
    };
    // The lag follows the new target: the controller regulates to 0.4 × target, so the median
    // lag settles near 20 ms instead of 40 ms. (At a 50 ms target the p99 is dominated by this
    // shared machine's scheduling hiccups of ~50-100 ms, so only the median is judged against
    // the new target; the p99 must still stay within the tolerance of the old one.)
    let judge = |r: &ExperimentReport| {
        let s = &r.samples;
        let mut f = Findings::default();
        let setpoint = new.as_secs_f64() * 1e3 * SETPOINT_FRACTION;
        let after = window(s, change_at + 2.0, end - 0.1);
        let p50 = lag_at_set_point(&mut f, &after, setpoint, 0.3);
        let bound = 100.0 * TOLERANCE;
        let (p99, why) =
            lag_quantile_judged(s, (change_at + 2.0, end - 0.1), 0.99, bound, setpoint, 0.3);
        f.check(
            p99 <= bound,
            || format!("lag p99 {p99:.1} ms over {TOLERANCE} × the old target"),
            why,
        );
        eprintln!("{TEST}: lag after the change p50 {p50:.1} ms, p99 {p99:.1} ms");
        f.verdict()
    };
    let (r, verdict) = run_judged(TEST, &cfg, judge);
    print_samples(&r);
    assert_replayed(&r);
    let (p, b) = (
        r.primary.as_ref().expect("primary"),
        r.backup.as_ref().expect("backup"),
    );
    // Both sides applied the same control at the same exit index...
    let pt = r.primary_target.expect("the primary applied the target");
    let bt = r.backup_target.expect("the backup applied the target");
    eprintln!("{TEST}: primary {pt:?}, backup {bt:?}");
    assert_eq!(pt, bt);
    assert_eq!(pt.target, new);
    assert_eq!(p.controls, b.controls);
    assert_eq!(p.controls.len(), 1, "{:?}", p.controls);
    assert_eq!(p.controls[0].exit, pt.exit);
    // ...and the primary's throttle switched to it, at a checkpoint after the proposal.
    let t = r.throttle.expect("throttle");
    assert_eq!(t.target_ms, 50.0);
    let switched = r
        .samples
        .iter()
        .find(|s| s.target_ms == 50.0)
        .expect("target switched");
    assert!(switched.t >= change_at, "switched at {:.2} s", switched.t);
    assert!(
        r.samples
            .iter()
            .filter(|s| s.t < change_at)
            .all(|s| s.target_ms == 100.0),
        "target changed before the proposal"
    );
    expect_pass(TEST, verdict);
}

/// The excuse for a lag spike is given only on evidence that the host took the backup's CPU:
/// a spike while the backup ran at its quota, or used less of it without waiting for a CPU
/// (a starved or late backup), is the controller's or the pair's and fails; one after the
/// backup waited on the run queue beyond its quota's throttling, or after the hypervisor
/// stole enough time, asks for another run.
#[test]
fn lag_spikes_are_excused_only_on_evidence_that_the_host_held_the_backup_up() {
    // 100 samples 50 ms apart, backup limited to 0.3 and using it, lag 40 ms (the set point);
    // the backup waits 0.65 of each interval, all of it its quota's throttling.
    let steady = |i: usize| Sample {
        t: i as f64 * 0.05,
        backup_cpu: 0.28,
        backup_share: 0.3,
        backup_wait: 0.65,
        backup_throttled: 0.65,
        lag_ms: 40.0,
        ..Default::default()
    };
    let mut s: Vec<Sample> = (0..100).map(steady).collect();
    // The settled test's judgement: p99 of the samples in [0, end) against 120 ms.
    let judge = |s: &[Sample]| lag_quantile_judged(s, (0.0, 10.0), 0.99, 120.0, 40.0, 0.3);
    assert_eq!(judge(&s), (40.0, None), "no spike");
    // Two spikes with the backup at its quota: not excused (the controller let it happen).
    s[60].lag_ms = 150.0;
    s[61].lag_ms = 140.0;
    assert_eq!(judge(&s), (140.0, None), "a controller fault");
    // One spike alone stays under the p99 of 100 samples.
    s[61].lag_ms = 40.0;
    assert_eq!(judge(&s).0, 40.0, "under the p99");
    s[61].lag_ms = 140.0;
    // The backup under its quota, waiting only for its quota (starved, or woke late): not
    // excused either. The old rule excused this.
    for x in &mut s[56..=58] {
        x.backup_cpu = 0.05;
        x.backup_wait = 0.9;
        x.backup_throttled = 0.9;
    }
    assert_eq!(judge(&s).1, None, "a starved backup is no excuse");
    // The backup waited for a CPU others had (beyond its throttling) 4 intervals before the
    // first spike: 0.6 × 50 ms = 30 ms lost in each of three intervals, against the
    // 0.5 × (150 − 40) × 0.3 = 16.5 ms the first spike needs: excused.
    for x in &mut s[56..=58] {
        x.backup_throttled = 0.3;
    }
    let why = judge(&s).1.expect("excused");
    assert!(
        why.contains("the host took 90 ms of CPU from the backup"),
        "{why}"
    );
    // ...but not when the interval is further back than the look-back.
    for (i, x) in s.iter_mut().enumerate().take(59).skip(56) {
        *x = steady(i);
    }
    s[60 - LOOKBACK - 1].backup_throttled = 0.0;
    assert_eq!(judge(&s).1, None, "too early");
    s[60 - LOOKBACK - 1] = steady(60 - LOOKBACK - 1);
    // The hypervisor's steal counts, spread over the machine's CPUs.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    s[59].host_steal = 0.7 * cpus;
    s[60].host_steal = 0.7 * cpus;
    assert!(judge(&s).1.is_some(), "steal before both spikes");
    // Every spike needs its excuse: a third spike far from the steal is the controller's.
    s[90].lag_ms = 130.0;
    assert_eq!(judge(&s).1, None, "one spike unexcused");
}

/// The verdict: any failure without evidence fails the run, however much else is excused.
#[test]
fn a_failure_without_evidence_outweighs_excused_ones() {
    let mut f = Findings::default();
    f.check(true, || unreachable!(), None);
    assert_eq!(std::mem::take(&mut f).verdict(), Verdict::Pass);
    f.check(false, || "late".into(), Some("steal".into()));
    f.check(false, || "slow".into(), None);
    assert_eq!(
        std::mem::take(&mut f).verdict(),
        Verdict::Fail("slow".into())
    );
    f.check(false, || "late".into(), Some("steal".into()));
    assert_eq!(f.verdict(), Verdict::Disturbed("late; steal".into()));
}
