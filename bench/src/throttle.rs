//! `throttle`: lag and primary CPU share over time while the backup is slowed and then
//! released, with the throttle (ours) and without it (the peer: flow control by buffer-full
//! stalls only, the original system's behaviour below its one-second throttle threshold).
//!
//! ```text
//! cargo run --release -p ftvm-bench -- throttle [--quick] [--target-ms N] [--backup-share S]
//!     [--kp K] [--ki K] [--tau-ms T]     (controller gains, see ftvm_ft::throttle)
//! ```
//!
//! An in-process primary/backup pair over TCP loopback runs a guest that logs a clock read
//! every ~20 µs of arithmetic ([`experiment::logging_guest`]). The backup's vCPU thread sits in
//! a cgroup: unlimited for 1 s, limited to `S` (default 0.3) of a CPU, then unlimited again.
//! Both vCPU cgroups get a high `cpu.shares` so unrelated work on the machine does not decide
//! their speed. Root and /dev/kvm needed. `--quick`: 5 s slowed (≈ 25 s in all); full: 12 s.
//!
//! `results/throttle.json`: one row per run (`throttled`, `no-throttle`) with the summary
//! (`target_ms`, `lag_p99_ms_settled`, `min_share`, `recovery_s`, ...) and the time series;
//! `results/throttle.svg`: lag and shares over time.

use std::time::Duration;

use anyhow::{bail, Context};
use ftvm_ft::throttle::{cgroup_cpu_unusable, PiConfig, ThrottleConfig};
use ftvm_testkit::experiment::{self, quantile, Event, ExperimentConfig, ExperimentReport, Sample};
use ftvm_vmm_core::error_chain;
use serde::Serialize;

use crate::report::{self, Panel, Series};
use crate::Opts;

/// One point of the time series.
#[derive(Debug, Serialize)]
struct Point {
    t_s: f64,
    /// Share set by the throttle (1 = unlimited).
    share: f64,
    /// CPU used by the primary's vCPU thread (fraction of a CPU).
    primary_cpu: f64,
    /// CPU used by the backup's vCPU thread.
    backup_cpu: f64,
    /// The backup's cgroup limit.
    backup_limit: f64,
    /// Time lag: age of the oldest entry the backup has not executed.
    lag_ms: f64,
    /// The throttle's predicted lag (0 without a throttle).
    predicted_ms: f64,
    /// Entries logged and not executed.
    lag_entries: u64,
    /// Entries logged per second since the previous point.
    entries_per_s: f64,
    /// CPU time the hypervisor gave to others since the previous point, summed over this
    /// machine's CPUs (fraction of a CPU): a lag spike under high steal is the host's.
    host_steal: f64,
}

/// One row of results/throttle.json: one run.
#[derive(Debug, Serialize)]
struct Row {
    run: &'static str,
    target_ms: f64,
    kp: f64,
    ki: f64,
    filter_tau_ms: f64,
    backup_share: f64,
    slow_at_s: f64,
    lift_at_s: f64,
    end_s: f64,
    /// p50 / p99 / max of the time lag from 2 s after the slow-down until the lift.
    lag_p50_ms_settled: f64,
    lag_p99_ms_settled: f64,
    lag_max_ms_settled: f64,
    /// Largest lag of the whole run (the onset transient included).
    lag_max_ms: f64,
    min_share: f64,
    mean_share_settled: f64,
    /// Lift → share back at 1 (s); `null` if it never came back.
    recovery_s: Option<f64>,
    /// Lift → time lag under 10 ms (s).
    lag_recovery_s: Option<f64>,
    /// Share-direction reversals per second while settled (a measure of oscillation).
    share_reversals_per_s: f64,
    entries_per_s_full: f64,
    entries_per_s_slowed: f64,
    entries_per_s_after: f64,
    /// Time the vCPU waited for log space.
    stall_s: f64,
    log_stalls: u64,
    replay_equal: bool,
    series: Vec<Point>,
}

struct Plan {
    target: Duration,
    pi: PiConfig,
    share: f64,
    slow_at: f64,
    lift_at: f64,
    end: f64,
}

/// Options of `ftvm-bench throttle`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// The throttle's lag target, ms.
    #[arg(long, default_value_t = 100)]
    pub target_ms: u64,
    /// The backup's CPU share while slowed, in (0, 1].
    #[arg(long, default_value_t = 0.3)]
    pub backup_share: f64,
    /// The PI controller's proportional gain [default: the throttle's].
    #[arg(long)]
    pub kp: Option<f64>,
    /// The PI controller's integral gain, per second [default: the throttle's].
    #[arg(long)]
    pub ki: Option<f64>,
    /// The lag filter's time constant, ms [default: the throttle's].
    #[arg(long)]
    pub tau_ms: Option<f64>,
}

fn parse(opts: &Opts, args: &Args) -> anyhow::Result<Plan> {
    let slowed = if opts.quick { 5.0 } else { 12.0 };
    let mut plan = Plan {
        target: Duration::from_millis(100),
        pi: PiConfig::default(),
        share: 0.3,
        slow_at: 1.0,
        lift_at: 1.0 + slowed,
        end: 1.0 + slowed + if opts.quick { 3.0 } else { 5.0 },
    };
    plan.target = Duration::from_millis(args.target_ms);
    plan.share = args.backup_share;
    if !(plan.share > 0.0 && plan.share <= 1.0) {
        bail!("--backup-share must be in (0, 1]");
    }
    if let Some(kp) = args.kp {
        plan.pi.kp = kp;
    }
    if let Some(ki) = args.ki {
        plan.pi.ki = ki;
    }
    if let Some(tau) = args.tau_ms {
        plan.pi.filter_tau = tau / 1e3;
    }
    Ok(plan)
}

fn window(s: &[Sample], from: f64, to: f64) -> Vec<&Sample> {
    s.iter().filter(|x| x.t >= from && x.t < to).collect()
}

fn rate(w: &[&Sample]) -> f64 {
    match (w.first(), w.last()) {
        (Some(a), Some(b)) if b.t > a.t => (b.logged - a.logged) as f64 / (b.t - a.t),
        _ => 0.0,
    }
}

fn reversals(w: &[&Sample]) -> usize {
    let mut n = 0;
    let mut dir = 0i8;
    for p in w.windows(2) {
        let d = p[1].share - p[0].share;
        let nd = if d > 0.02 {
            1
        } else if d < -0.02 {
            -1
        } else {
            0
        };
        if nd != 0 && dir != 0 && nd != dir {
            n += 1;
        }
        if nd != 0 {
            dir = nd;
        }
    }
    n
}

fn summarize(run: &'static str, plan: &Plan, r: &ExperimentReport) -> Row {
    let s = &r.samples;
    let settled = window(s, plan.slow_at + 2.0, plan.lift_at);
    let lags: Vec<f64> = settled.iter().map(|x| x.lag_ms).collect();
    let mean_share = settled.iter().map(|x| x.share).sum::<f64>() / settled.len().max(1) as f64;
    let settled_span = match (settled.first(), settled.last()) {
        (Some(a), Some(b)) => (b.t - a.t).max(1e-3),
        _ => 1.0,
    };
    let after_lift = |ok: &dyn Fn(&Sample) -> bool| {
        s.iter()
            .find(|x| x.t >= plan.lift_at && ok(x))
            .map(|x| x.t - plan.lift_at)
    };
    let (stall_s, log_stalls, replay_equal) = match (&r.primary, &r.backup) {
        (Ok(p), Ok(b)) => (
            p.log_stalls.time.as_secs_f64(),
            p.log_stalls.count,
            p.mem_digest == b.mem_digest && p.regs_digest == b.regs_digest && p.exits == b.exits,
        ),
        (Ok(p), Err(_)) => (p.log_stalls.time.as_secs_f64(), p.log_stalls.count, false),
        _ => (0.0, 0, false),
    };
    let mut prev: Option<&Sample> = None;
    let series = s
        .iter()
        .map(|x| {
            let eps = prev.map_or(0.0, |p| {
                (x.logged - p.logged) as f64 / (x.t - p.t).max(1e-6)
            });
            prev = Some(x);
            Point {
                t_s: x.t,
                share: x.share,
                primary_cpu: x.primary_cpu,
                backup_cpu: x.backup_cpu,
                backup_limit: x.backup_share,
                lag_ms: x.lag_ms,
                predicted_ms: x.predicted_ms,
                lag_entries: x.logged.saturating_sub(x.executed),
                entries_per_s: eps,
                host_steal: x.host_steal,
            }
        })
        .collect();
    Row {
        run,
        target_ms: plan.target.as_secs_f64() * 1e3,
        kp: plan.pi.kp,
        ki: plan.pi.ki,
        filter_tau_ms: plan.pi.filter_tau * 1e3,
        backup_share: plan.share,
        slow_at_s: plan.slow_at,
        lift_at_s: plan.lift_at,
        end_s: plan.end,
        lag_p50_ms_settled: quantile(&lags, 0.5),
        lag_p99_ms_settled: quantile(&lags, 0.99),
        lag_max_ms_settled: quantile(&lags, 1.0),
        lag_max_ms: s.iter().map(|x| x.lag_ms).fold(0.0, f64::max),
        min_share: s.iter().map(|x| x.share).fold(1.0, f64::min),
        mean_share_settled: mean_share,
        recovery_s: if run == "throttled" {
            after_lift(&|x| x.share >= 1.0)
        } else {
            None
        },
        lag_recovery_s: after_lift(&|x| x.lag_ms < 10.0),
        share_reversals_per_s: reversals(&settled) as f64 / settled_span,
        entries_per_s_full: rate(&window(s, 0.2, plan.slow_at)),
        entries_per_s_slowed: rate(&settled),
        entries_per_s_after: rate(&window(s, plan.lift_at + 1.0, plan.end - 0.1)),
        stall_s,
        log_stalls,
        replay_equal,
        series,
    }
}

/// Runs the benchmark.
pub fn run(opts: &Opts, args: &Args) -> anyhow::Result<()> {
    if let Some(r) = ftvm_vmm_core::kvm::missing().or_else(cgroup_cpu_unusable) {
        bail!("needs /dev/kvm and a writable cgroup v1 cpu controller (root): {r}");
    }
    let plan = parse(opts, args)?;
    let events = vec![
        (
            Duration::from_secs_f64(plan.slow_at),
            Event::BackupShare(plan.share),
        ),
        (
            Duration::from_secs_f64(plan.lift_at),
            Event::BackupShare(1.0),
        ),
    ];
    let mut rows = Vec::new();
    for (name, throttle) in [
        (
            "throttled",
            Some(ThrottleConfig {
                target: plan.target,
                pi: plan.pi,
                status_interval: Duration::ZERO,
                ..Default::default()
            }),
        ),
        ("no-throttle", None),
    ] {
        eprintln!("throttle: run {name:?} ({:.0} s of guest time)", plan.end);
        let r = experiment::run(&ExperimentConfig {
            run_for: Duration::from_secs_f64(plan.end),
            throttle,
            events: events.clone(),
            ..Default::default()
        })
        .with_context(|| format!("run {name}"))?;
        if let Err(e) = &r.primary {
            bail!("run {name}: primary failed: {}", error_chain(e));
        }
        if let Err(e) = &r.backup {
            bail!("run {name}: backup failed: {}", error_chain(e));
        }
        rows.push(summarize(name, &plan, &r));
    }
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.run.to_string(),
                format!("{:.0}", r.target_ms),
                format!("{:.1}", r.lag_p50_ms_settled),
                format!("{:.1}", r.lag_p99_ms_settled),
                format!("{:.0}", r.lag_max_ms),
                format!("{:.2}", r.min_share),
                format!("{:.2}", r.mean_share_settled),
                r.recovery_s.map_or("-".into(), |v| format!("{v:.2}")),
                format!("{:.2}", r.stall_s),
                format!("{:.0}", r.entries_per_s_slowed),
                format!("{:.0}", r.entries_per_s_after),
            ]
        })
        .collect();
    report::print_table(
        &format!("throttle: backup at {:.0} % of a CPU", plan.share * 100.0),
        &[
            "run",
            "target ms",
            "lag p50 ms",
            "lag p99 ms",
            "lag max ms",
            "min share",
            "mean share",
            "recovery s",
            "stall s",
            "entries/s slowed",
            "entries/s after",
        ],
        &table,
    );
    let path = report::write_json(opts, "throttle", &rows)?;
    let pts = |row: &Row, f: fn(&Point) -> f64| -> Vec<(f64, f64)> {
        row.series.iter().map(|p| (p.t_s, f(p))).collect()
    };
    let ours = &rows[0];
    let peer = &rows[1];
    let target_line = vec![(0.0, ours.target_ms), (plan.end, ours.target_ms)];
    let panels = vec![
        Panel {
            title: format!(
                "lag, throttled (backup at {:.0} % from {:.0} s to {:.0} s)",
                plan.share * 100.0,
                plan.slow_at,
                plan.lift_at
            ),
            x_label: "time (s)".into(),
            y_label: "ms".into(),
            log_x: false,
            log_y: false,
            categories: Vec::new(),
            series: vec![
                Series {
                    label: "time lag".into(),
                    points: pts(ours, |p| p.lag_ms),
                },
                Series {
                    label: "target".into(),
                    points: target_line,
                },
            ],
        },
        Panel {
            title: "CPU share, throttled".into(),
            x_label: "time (s)".into(),
            y_label: "share of a CPU".into(),
            log_x: false,
            log_y: false,
            categories: Vec::new(),
            series: vec![
                Series {
                    label: "primary share (set)".into(),
                    points: pts(ours, |p| p.share),
                },
                Series {
                    label: "primary CPU (used)".into(),
                    points: pts(ours, |p| p.primary_cpu),
                },
                Series {
                    label: "backup limit".into(),
                    points: pts(ours, |p| p.backup_limit),
                },
            ],
        },
        Panel {
            title: "lag without the throttle (buffer-full stalls only)".into(),
            x_label: "time (s)".into(),
            y_label: "ms".into(),
            log_x: false,
            log_y: false,
            categories: Vec::new(),
            series: vec![Series {
                label: "time lag".into(),
                points: pts(peer, |p| p.lag_ms),
            }],
        },
    ];
    let svg = report::plot_svg(opts, "throttle", &panels)?;
    eprintln!("wrote {} and {}", path.display(), svg.display());
    Ok(())
}
