//! Flow control and throttling with real KVM VMs, a real log channel (TCP loopback) and real
//! cgroups: a backup whose vCPU thread is limited to 30 % of a CPU throttles the primary and
//! the lag stays under the target; lifting the limit restores full speed; a backup that stops
//! acknowledging stalls the primary with bounded memory, and the log arrives whole.
//!
//! The tests take the machine's two cores for themselves: they run one at a time.

use std::sync::Mutex;
use std::time::Duration;

use ftvm_vmm_core::ft::throttle::experiment::{
    self, quantile, Event, ExperimentConfig, ExperimentReport, Sample,
};
use ftvm_vmm_core::ft::throttle::{cgroup_cpu_unusable, ThrottleConfig};
use ftvm_vmm_core::testing::kvm_missing;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Prints `SKIP <test>: <reason>` and returns when KVM or the cgroup cpu controller is missing.
macro_rules! require_kvm_and_cgroup {
    ($name:expr) => {
        if let Some(r) = kvm_missing().or_else(cgroup_cpu_unusable) {
            eprintln!("SKIP {}: {}", $name, r);
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

fn rate(w: &[&Sample]) -> f64 {
    match (w.first(), w.last()) {
        (Some(a), Some(b)) if b.t > a.t => (b.logged - a.logged) as f64 / (b.t - a.t),
        _ => 0.0,
    }
}

fn print_samples(r: &ExperimentReport) {
    for (i, s) in r.samples.iter().enumerate() {
        if i % 10 != 0 && s.lag_ms < 100.0 {
            continue;
        }
        eprintln!(
            "t={:5.2} share={:.2} cpu p={:.2} b={:.2} (limit {:.2}) lag={:6.1} ms pred={:6.1} ms entries={} inflight={} stalls={} steal={:.2}",
            s.t,
            s.share,
            s.primary_cpu,
            s.backup_cpu,
            s.backup_share,
            s.lag_ms,
            s.predicted_ms,
            s.logged.saturating_sub(s.executed),
            s.logged.saturating_sub(s.acked),
            s.stalls,
            s.host_steal
        );
    }
}

/// Why the timing of a run says nothing about the controller, if it does not: the test
/// process was starved by other work on the machine (a gap in the samples, or the limited
/// backup getting far less CPU than its quota while it had entries to execute).
fn starved(r: &ExperimentReport, from: f64, to: f64) -> Option<String> {
    let w = window(&r.samples, from, to);
    for p in w.windows(2) {
        if p[1].t - p[0].t > 0.25 {
            return Some(format!(
                "no sample for {:.2} s at t={:.2} s",
                p[1].t - p[0].t,
                p[0].t
            ));
        }
    }
    let busy: Vec<&&Sample> = w
        .iter()
        .filter(|s| s.logged > s.executed && s.backup_share < 1.0)
        .collect();
    if !busy.is_empty() {
        let used = busy
            .iter()
            .map(|s| s.backup_cpu / s.backup_share)
            .sum::<f64>()
            / busy.len() as f64;
        if used < 0.6 {
            return Some(format!(
                "the limited backup got {:.0} % of its quota",
                used * 100.0
            ));
        }
    }
    None
}

/// Intervals before a sample that a lag spike at it can come from: the lag rises while the
/// backup is held up and falls back over a few hundred milliseconds.
const LOOKBACK: usize = 6;

/// Why the lag at sample `i` says nothing about the controller, if it does not: in one of the
/// [`LOOKBACK`] intervals before it, the test process went unsampled (a gap of more than two
/// sampling periods) or the limited backup had entries to execute and got less than half of its
/// quota. Neither is something the primary's throttle can cause or prevent: the backup was
/// held up by the machine (the hypervisor's steal, other work).
fn held_up_before(s: &[Sample], i: usize, period: f64) -> Option<String> {
    (i.saturating_sub(LOOKBACK).max(1)..=i).find_map(|j| {
        let (a, b) = (&s[j - 1], &s[j]);
        if b.t - a.t > 2.0 * period {
            return Some(format!(
                "no sample for {:.0} ms before t={:.2} s",
                (b.t - a.t) * 1e3,
                b.t
            ));
        }
        (a.logged > a.executed && b.backup_share < 1.0 && b.backup_cpu < 0.5 * b.backup_share)
            .then(|| {
                format!(
                    "the backup used {:.2} of a CPU under a {:.2} quota with entries to execute at t={:.2} s (host steal {:.2})",
                    b.backup_cpu, b.backup_share, b.t, b.host_steal
                )
            })
    })
}

/// Why the `q` quantile of a run's lag over samples `from..to` failed its `bound` (ms) for reasons outside
/// the controller, if it did: every sample over the bound follows an interval in which the
/// machine held the backup up ([`held_up_before`]). `None` when the bound holds, or when a
/// sample over it has no such excuse (a controller fault: the test must fail).
fn lag_spikes_held_up(s: &[Sample], from: f64, to: f64, q: f64, bound: f64) -> Option<String> {
    let idx: Vec<usize> = (0..s.len())
        .filter(|&i| s[i].t >= from && s[i].t < to)
        .collect();
    let lags: Vec<f64> = idx.iter().map(|&i| s[i].lag_ms).collect();
    if quantile(&lags, q) <= bound {
        return None;
    }
    let period = SAMPLE_EVERY.as_secs_f64();
    let why: Vec<String> = idx
        .iter()
        .filter(|&&i| s[i].lag_ms > bound)
        .map(|&i| held_up_before(s, i, period))
        .collect::<Option<_>>()?;
    Some(format!(
        "{} samples over {bound:.0} ms, each after the backup was held up; first: {}",
        why.len(),
        why[0]
    ))
}

/// The experiments' sampling period (their default).
const SAMPLE_EVERY: Duration = Duration::from_millis(50);

/// Runs `cfg` until a run's timing is meaningful (at most 3 attempts: the machine is shared):
/// not [`starved`], and `judge` (a test's own timing check) finds no disturbance. Returns the
/// last run and, if it was still disturbed, why.
fn run_undisturbed(
    test: &str,
    cfg: &ExperimentConfig,
    end: f64,
    judge: impl Fn(&ExperimentReport) -> Option<String>,
) -> (ExperimentReport, Option<String>) {
    assert_eq!(cfg.sample_every, SAMPLE_EVERY);
    let mut attempt = 1;
    loop {
        let r = experiment::run(cfg).expect("experiment");
        let why = starved(&r, 0.0, end).or_else(|| judge(&r));
        match why {
            Some(w) if attempt < 3 => {
                eprintln!("{test}: attempt {attempt} disturbed by the machine ({w}); again");
                print_samples(&r);
                attempt += 1;
            }
            _ => return (r, why),
        }
    }
}

/// Tolerance of the settled lag: p99 of the samples taken after the controller settled must
/// stay within `TOLERANCE × target`.
const TOLERANCE: f64 = 1.2;

#[test]
fn throttle_slowed_backup_keeps_lag_under_target_and_full_speed_returns() {
    const TEST: &str = "throttle_slowed_backup_keeps_lag_under_target_and_full_speed_returns";
    require_kvm_and_cgroup!(TEST);
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // 0–1 s full speed; 1–9 s backup limited to 30 % of a CPU; 9–15 s unlimited again.
    let (slow_at, lift_at, end) = (1.0, 9.0, 15.0);
    let target = Duration::from_millis(100);
    let cfg = ExperimentConfig {
        run_for: secs(end),
        throttle: Some(ThrottleConfig {
            target,
            ..Default::default()
        }),
        events: vec![
            (secs(slow_at), Event::BackupShare(0.3)),
            (secs(lift_at), Event::BackupShare(1.0)),
        ],
        ..Default::default()
    };
    let bound = target.as_secs_f64() * 1e3 * TOLERANCE;
    let (r, disturbed) = run_undisturbed(TEST, &cfg, end, |r| {
        lag_spikes_held_up(&r.samples, slow_at + 3.0, lift_at, 0.99, bound)
    });
    print_samples(&r);
    assert_replayed(&r);
    if let Some(why) = disturbed {
        eprintln!("SKIP {TEST} (timing assertions): the machine is overloaded: {why}");
        return;
    }
    let s = &r.samples;
    let t = r.throttle.expect("throttle status");
    eprintln!("{TEST}: final throttle status {t:?}");

    // The primary was throttled.
    let slowed = window(s, slow_at + 3.0, lift_at);
    let min_share = s.iter().map(|x| x.share).fold(1.0, f64::min);
    assert!(min_share < 0.7, "never throttled: min share {min_share:.2}");
    let mean_share = slowed.iter().map(|x| x.share).sum::<f64>() / slowed.len() as f64;
    assert!(mean_share < 0.8, "mean share while slowed {mean_share:.2}");

    // Settled (3 s after the slow-down until the lift): p99 of the lag under the tolerance.
    let lags: Vec<f64> = slowed.iter().map(|x| x.lag_ms).collect();
    let p99 = quantile(&lags, 0.99);
    let p50 = quantile(&lags, 0.5);
    eprintln!(
        "{TEST}: settled lag p50 {p50:.1} ms p99 {p99:.1} ms (target {} ms), mean share {mean_share:.2}",
        target.as_millis()
    );
    assert!(
        p99 <= bound,
        "settled lag p99 {p99:.1} ms over {TOLERANCE} × target"
    );

    // The log buffer never filled: no stall, and never more than the capacity in flight.
    let p = r.primary.as_ref().expect("primary");
    assert_eq!(p.log_stalls.count, 0, "the vCPU waited for log space");
    let bytes_per_entry = p.log_bytes as f64 / p.entries.max(1) as f64 + 16.0;
    let max_inflight = s
        .iter()
        .map(|x| x.logged.saturating_sub(x.acked))
        .max()
        .unwrap_or(0);
    assert!(
        (max_inflight as f64) * bytes_per_entry < r.ring_capacity as f64 / 2.0,
        "{max_inflight} entries in flight"
    );

    // Lifted: the primary speeds up. Back at full share within 6 s when the unlimited backup
    // can keep up with a full-speed primary, i.e. when the machine gives it most of a CPU (both
    // vCPUs need ~0.85 of a CPU each at full speed: two cores, with pollers and whatever else
    // runs here). Idle, it takes 1.1–1.8 s; a CI run that shared the host with a build took
    // 4.1 s while the lag sat at the set point (a controller that never lifts fails either way).
    let after = window(s, lift_at + 0.5, end - 0.2);
    let mean_after = after.iter().map(|x| x.share).sum::<f64>() / after.len().max(1) as f64;
    let (fast, slow) = (rate(&after), rate(&slowed));
    eprintln!(
        "{TEST}: mean share after the lift {mean_after:.2}; entries/s slowed {slow:.0}, after the lift {fast:.0}"
    );
    assert!(
        mean_after >= 1.4 * mean_share,
        "mean share after the lift {mean_after:.2} (while slowed {mean_share:.2})"
    );
    assert!(
        fast > 1.4 * slow,
        "entries/s slowed {slow:.0}, after {fast:.0}"
    );
    let busy: Vec<f64> = after
        .iter()
        .filter(|x| x.logged > x.executed)
        .map(|x| x.backup_cpu)
        .collect();
    let backup_cpu = busy.iter().sum::<f64>() / busy.len().max(1) as f64;
    let back = s
        .iter()
        .find(|x| x.t >= lift_at && x.share >= 1.0)
        .map(|x| x.t - lift_at);
    eprintln!(
        "{TEST}: full share {back:?} s after the lift (the backup used {backup_cpu:.2} of a CPU)"
    );
    match back {
        Some(b) if b <= 6.0 => {}
        _ if backup_cpu < 0.9 => eprintln!(
            "SKIP {TEST} (full share within 6 s of the lift): the unlimited backup got only {backup_cpu:.2} of a CPU on this loaded machine"
        ),
        _ => panic!("full share {back:?} s after the lift, the backup used {backup_cpu:.2} of a CPU"),
    }
}

#[test]
fn throttle_backup_that_stops_acking_stalls_the_primary_with_bounded_memory() {
    const TEST: &str = "throttle_backup_that_stops_acking_stalls_the_primary_with_bounded_memory";
    require_kvm_and_cgroup!(TEST);
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
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
    let max_inflight = s
        .iter()
        .map(|x| x.logged.saturating_sub(x.acked))
        .max()
        .unwrap_or(0);
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
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
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
    let e = r.primary.as_ref().expect_err("the primary must fail");
    eprintln!("{TEST}: primary: {e}");
    // Either the append that found the buffer full and the link down, or the link watch of a
    // pair without an arbiter (PairError::PeerFailed) stops it first; both name the dead link.
    assert!(
        e.contains("link is down") || e.contains("nothing heard from the peer"),
        "{e}"
    );
    let last = r.samples.last().expect("samples");
    assert!(
        last.t < 5.0,
        "failure detection took {:.1} s (peer timeout 1 s)",
        last.t
    );
    let max_inflight = r
        .samples
        .iter()
        .map(|x| x.logged.saturating_sub(x.acked))
        .max()
        .unwrap_or(0);
    assert!(
        max_inflight as usize * 16 <= capacity,
        "{max_inflight} in flight"
    );
    assert!(
        r.backup.is_err(),
        "the backup cannot finish a log that stopped"
    );
}

#[test]
fn throttle_target_change_is_agreed_through_the_log() {
    const TEST: &str = "throttle_target_change_is_agreed_through_the_log";
    require_kvm_and_cgroup!(TEST);
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
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
    let (r, disturbed) = run_undisturbed(TEST, &cfg, end, |r| {
        lag_spikes_held_up(
            &r.samples,
            change_at + 2.0,
            end - 0.1,
            0.99,
            100.0 * TOLERANCE,
        )
    });
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
    if let Some(why) = disturbed {
        eprintln!("SKIP {TEST} (timing assertions): the machine is overloaded: {why}");
        return;
    }
    // The lag follows the new target: the controller regulates to 0.4 × target, so the median
    // lag settles near 20 ms instead of 40 ms. (At a 50 ms target the p99 is dominated by this
    // shared machine's scheduling hiccups of ~50-100 ms, so only the median is judged against
    // the new target; the p99 must still stay within the tolerance of the old one.)
    let after: Vec<f64> = window(&r.samples, change_at + 2.0, end - 0.1)
        .iter()
        .map(|s| s.lag_ms)
        .collect();
    let (p50_after, p99_after) = (quantile(&after, 0.5), quantile(&after, 0.99));
    eprintln!("{TEST}: lag after the change p50 {p50_after:.1} ms, p99 {p99_after:.1} ms");
    assert!(
        p50_after <= 0.6 * 50.0,
        "median lag {p50_after:.1} ms: the lag did not follow the 50 ms target"
    );
    assert!(
        p99_after <= 100.0 * TOLERANCE,
        "lag p99 {p99_after:.1} ms over {TOLERANCE} × the old target"
    );
}

/// The excuse for a lag spike is given only for what the machine did: a spike while the backup
/// ran at its quota is the controller's and fails the test; one after a gap in the samples or
/// after the backup got under half its quota with work to do asks for another run.
#[test]
fn lag_spikes_are_excused_only_after_the_machine_held_the_backup_up() {
    // 100 samples 50 ms apart, backup limited to 0.3 and using it, lag 40 ms.
    let steady = |i: usize| Sample {
        t: i as f64 * 0.05,
        backup_cpu: 0.28,
        backup_share: 0.3,
        lag_ms: 40.0,
        logged: 100 * i as u64 + 50,
        executed: 100 * i as u64,
        ..Default::default()
    };
    let mut s: Vec<Sample> = (0..100).map(steady).collect();
    // The settled test's judgement: p99 of the samples in [0, end) against 120 ms.
    let judge = |s: &[Sample], end: f64| lag_spikes_held_up(s, 0.0, end, 0.99, 120.0);
    assert_eq!(judge(&s, 5.0), None, "no spike");
    // Two spikes with the backup at its quota: not excused (the controller let it happen).
    s[60].lag_ms = 150.0;
    s[61].lag_ms = 140.0;
    assert_eq!(judge(&s, 5.0), None, "a controller fault");
    // One spike alone stays under the p99 of 100 samples.
    s[61].lag_ms = 40.0;
    assert_eq!(judge(&s, 5.0), None, "under the p99");
    s[61].lag_ms = 140.0;
    // The backup starved with work to do 4 intervals before the first spike: excused...
    s[57].backup_cpu = 0.05;
    let why = judge(&s, 5.0).expect("excused");
    assert!(why.contains("the backup used 0.05"), "{why}");
    // ...but not when it had nothing to execute (caught up: idle by choice)...
    s[56].executed = s[56].logged;
    assert_eq!(judge(&s, 5.0), None, "idle backup");
    // ...nor when the starved interval is further back than the look-back.
    s[56] = steady(56);
    s[57] = steady(57);
    s[60 - LOOKBACK - 1].backup_cpu = 0.05;
    assert_eq!(judge(&s, 5.0), None, "too early");
    // A gap in the samples (the test process not scheduled) before the spikes: excused.
    for x in &mut s[59..] {
        x.t += 0.2;
    }
    let why = judge(&s, 5.2).expect("excused");
    assert!(why.contains("no sample for 250 ms"), "{why}");
    // Every spike needs its excuse: a third spike far from the gap is the controller's.
    s[90].lag_ms = 130.0;
    assert_eq!(judge(&s, 5.2), None, "one spike unexcused");
}
