//! `failover`: failover time (SIGKILL of the primary → backup live → first client reply) over
//! repeated runs of `ftvm demo` (kv under the demo's client load, file arbiter, each run in a
//! fresh network namespace), p50 and max, and the acknowledged writes checked and lost.
//!
//! ```text
//! cargo run --release -p ftvm-bench -- failover [--quick] [--runs N] [--transport T] [--fail-timeout MS]
//! ```
//! `--quick`: 3 runs; full: 10. Runs the `ftvm` binary next to this one (root, /dev/kvm).

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context};
use serde::Serialize;

use crate::report::{self, Panel, Series};
use crate::Opts;

/// One row of results/failover.json: the runs of one transport.
#[derive(Debug, Serialize)]
struct Row {
    transport: String,
    fail_timeout_ms: Option<u64>,
    runs: usize,
    failover_ms_p50: f64,
    failover_ms_max: f64,
    failover_ms_min: f64,
    /// Failover time of every run, in run order.
    failover_ms: Vec<f64>,
    /// SIGKILL → the backup's LIVE line, per run.
    live_line_ms: Vec<Option<f64>>,
    acked_writes_checked: u64,
    acked_writes_lost: u64,
    ops_per_s_before_p50: f64,
    ops_per_s_after_p50: f64,
    client_errors: u64,
}

/// Options of `ftvm-bench failover`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Failovers to measure [default: 10, 3 with --quick].
    #[arg(long, value_parser = clap::value_parser!(usize))]
    pub runs: Option<usize>,
    /// The pair's log transport (`ftvm demo --transport`).
    #[arg(long, default_value = "shm")]
    pub transport: String,
    /// The pair's failure timeout in ms (`ftvm demo --fail-timeout`) [default: ftvm's].
    #[arg(long)]
    pub fail_timeout: Option<u64>,
}

/// The resolved options.
struct Plan {
    runs: usize,
    transport: String,
    fail_timeout: Option<u64>,
}

fn plan(opts: &Opts, args: &Args) -> anyhow::Result<Plan> {
    let runs = args.runs.unwrap_or(if opts.quick { 3 } else { 10 });
    if runs == 0 {
        bail!("--runs must be at least 1");
    }
    Ok(Plan {
        runs,
        transport: args.transport.clone(),
        fail_timeout: args.fail_timeout,
    })
}

/// One `ftvm demo --report` run; its summary.
fn one_run(bin: &Path, a: &Plan, report: &Path) -> anyhow::Result<serde_json::Value> {
    let mut cmd = Command::new(bin);
    cmd.args(["demo", "--quiet", "--transport", &a.transport, "--report"])
        .arg(report);
    if let Some(ms) = a.fail_timeout {
        cmd.args(["--fail-timeout", &ms.to_string()]);
    }
    let out = cmd.output().context("cannot run ftvm demo")?;
    let text = std::fs::read_to_string(report).ok();
    match text {
        Some(t) => Ok(serde_json::from_str(&t).context("ftvm demo report is not JSON")?),
        None => bail!(
            "ftvm demo failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// Runs the benchmark.
pub fn run(opts: &Opts, args: &Args) -> anyhow::Result<()> {
    let a = plan(opts, args)?;
    let bin = crate::ft::ftvm_binary()?;
    let dir = std::env::temp_dir().join(format!("ftvm-bench-failover-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let result = runs_of(opts, &a, &bin, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn runs_of(opts: &Opts, a: &Plan, bin: &Path, dir: &Path) -> anyhow::Result<()> {
    let bar = report::progress(a.runs as u64, "failover");
    let mut runs = Vec::new();
    for i in 0..a.runs {
        let path = dir.join(format!("run-{i}.json"));
        let r = one_run(bin, a, &path).with_context(|| format!("run {i}"))?;
        bar.set_message(format!(
            "{:.0} ms",
            r["failover_ms"].as_f64().unwrap_or(0.0)
        ));
        bar.inc(1);
        runs.push(r);
    }
    bar.finish_and_clear();
    let num = |r: &serde_json::Value, k: &str| r[k].as_f64().unwrap_or(f64::NAN);
    let total = |k: &str| runs.iter().map(|r| r[k].as_u64().unwrap_or(0)).sum::<u64>();
    let failover: Vec<f64> = runs.iter().map(|r| num(r, "failover_ms")).collect();
    let mut sorted = failover.clone();
    let row = Row {
        transport: a.transport.clone(),
        fail_timeout_ms: a.fail_timeout,
        runs: runs.len(),
        failover_ms_p50: report::median(&mut sorted),
        failover_ms_max: failover.iter().copied().fold(f64::MIN, f64::max),
        failover_ms_min: failover.iter().copied().fold(f64::MAX, f64::min),
        live_line_ms: runs.iter().map(|r| r["live_line_ms"].as_f64()).collect(),
        failover_ms: failover.clone(),
        acked_writes_checked: total("acked_writes_checked"),
        acked_writes_lost: total("acked_writes_lost"),
        ops_per_s_before_p50: report::median(
            &mut runs
                .iter()
                .map(|r| num(r, "ops_per_s_before"))
                .collect::<Vec<_>>(),
        ),
        ops_per_s_after_p50: report::median(
            &mut runs
                .iter()
                .map(|r| num(r, "ops_per_s_after"))
                .collect::<Vec<_>>(),
        ),
        client_errors: total("client_errors"),
    };
    report::print_table(
        "failover (SIGKILL primary → first client reply from the new primary)",
        &[
            "transport",
            "runs",
            "p50 ms",
            "max ms",
            "checked",
            "lost",
            "ops/s before",
            "ops/s after",
        ],
        &[vec![
            row.transport.clone(),
            row.runs.to_string(),
            format!("{:.0}", row.failover_ms_p50),
            format!("{:.0}", row.failover_ms_max),
            row.acked_writes_checked.to_string(),
            row.acked_writes_lost.to_string(),
            format!("{:.0}", row.ops_per_s_before_p50),
            format!("{:.0}", row.ops_per_s_after_p50),
        ]],
    );
    let path = report::write_json(opts, "failover", std::slice::from_ref(&row))?;
    let mut series = vec![Series {
        label: "kill → first client reply".into(),
        points: failover
            .iter()
            .enumerate()
            .map(|(i, ms)| ((i + 1) as f64, *ms))
            .collect(),
    }];
    let live: Vec<(f64, f64)> = row
        .live_line_ms
        .iter()
        .enumerate()
        .filter_map(|(i, ms)| ms.map(|ms| ((i + 1) as f64, ms)))
        .collect();
    if !live.is_empty() {
        series.push(Series {
            label: "kill → backup LIVE line".into(),
            points: live,
        });
    }
    let svg = report::plot_svg(
        opts,
        "failover",
        &[Panel {
            title: format!(
                "failover time per run ({}, kv, {} runs)",
                a.transport, row.runs
            ),
            x_label: "run".into(),
            y_label: "ms".into(),
            log_x: false,
            log_y: false,
            categories: Vec::new(),
            series,
        }],
    )?;
    eprintln!("wrote {} and {}", path.display(), svg.display());
    if row.acked_writes_lost > 0 {
        bail!("{} acknowledged writes lost", row.acked_writes_lost);
    }
    Ok(())
}
