//! `reprotect`: re-protection pause and duration. A kv pair (`ftvm primary --accept-join`)
//! under client load loses its backup (SIGKILL) and runs alone; then, `--runs` times, a new
//! `ftvm backup --join` is cloned from the running VM (live state transfer), and SIGKILLed
//! once it replays (the primary goes alone again). Per join: the guest's pause at the cut,
//! the transfer's duration, bytes and pre-copy rounds (from the primary's `REPROTECTED`
//! line); and the latency of a probe client (one `SET` at a time) during the joins against
//! the rest of the run — the peer measured in the same run. Every acknowledged write of the
//! load is read back at the end. The same for the `stream` guest rewriting 24 MiB of its
//! memory page by page without pause (`dirty=24M`, no client: a guest that dirties memory as
//! fast as its vCPU runs, where auto-converge may lower its CPU share; the lowest share is in
//! each join's figures).
//!
//! ```text
//! cargo run --release -p ftvm-bench -- reprotect [--quick] [--runs N] [--transport tcp,..] [--guest kv,stream]
//! ```
//! `--quick`: 3 joins; full: 10. Root and /dev/kvm (a network namespace and a TAP).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ftvm::client::{Checker, Load, LoadConfig, RespConn};
use ftvm::scenario::{Node, Scenario, ScenarioConfig, Side, JOIN_PORT};
use serde::Serialize;

use crate::report::{self, Panel, Series};
use crate::Opts;

/// The transports measured by default (xdp with the `xdp` feature: the ftvm binary must be
/// built with it too).
fn transports() -> Vec<String> {
    let mut t = vec!["tcp", "tcp-spin", "uring", "shm"];
    if cfg!(feature = "xdp") {
        t.push("xdp");
    }
    t.into_iter().map(String::from).collect()
}

/// Options of `ftvm-bench reprotect`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Joins to measure [default: 10, 3 with --quick].
    #[arg(long, value_parser = clap::value_parser!(usize))]
    pub runs: Option<usize>,
    /// The pair's log transports, one pair each (tcp, tcp-spin, uring: the join's connection
    /// carries the log; shm, xdp: a link of its own, opened after the transfer).
    #[arg(long, value_delimiter = ',', default_values_t = transports())]
    pub transport: Vec<String>,
    /// Client load threads (besides the latency probe).
    #[arg(long, default_value_t = 4)]
    pub threads: usize,
    /// The guests: `kv` (under client load) and `stream` (dirtying 24 MiB without pause).
    #[arg(long, value_delimiter = ',', default_value = "kv,stream")]
    pub guest: Vec<String>,
}

/// The `stream` guest's command line in this benchmark.
const STREAM_DIRTY: &str = "ip=10.0.2.15/24 gw=10.0.2.1 dirty=24M";

/// One join, from the primary's `REPROTECTED` line.
#[derive(Debug, Clone, Copy, Serialize)]
struct Join {
    generation: u64,
    rounds: f64,
    mbytes: f64,
    transfer_s: f64,
    pause_ms: f64,
    /// Pages copied inside the pause.
    pages_at_cut: f64,
    /// Where the pause went (ms): state capture, last dirty harvest, copy of the last pages,
    /// re-gating and the new monitor, the log header (the primary's `pause:` breakdown).
    capture_ms: f64,
    harvest_ms: f64,
    copy_ms: f64,
    rejoin_ms: f64,
    header_ms: f64,
    /// The lowest vCPU share auto-converge set (1: none).
    min_share: f64,
}

/// One row of results/reprotect.json.
#[derive(Debug, Serialize)]
struct Row {
    transport: String,
    guest: String,
    runs: usize,
    pause_ms_p50: f64,
    pause_ms_p99: f64,
    pause_ms_max: f64,
    transfer_s_p50: f64,
    mbytes_sent_p50: f64,
    rounds_p50: f64,
    /// The lowest vCPU share auto-converge set in any join (1: never throttled).
    min_share: f64,
    /// The probe's SET latency p99 while a join ran (JOIN sent → the joiner replays).
    client_p99_us_during: f64,
    /// The same outside the joins (the peer, same run).
    client_p99_us_outside: f64,
    client_samples_during: usize,
    acked_writes_checked: u64,
    acked_writes_lost: u64,
    client_errors: u64,
    joins: Vec<Join>,
}

/// The number after `key` in `line` (`"pause 3.7 ms"` → 3.7 for `"pause "`).
fn number_after(line: &str, key: &str) -> Option<f64> {
    let rest = &line[line.find(key)? + key.len()..];
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// Parses `primary: REPROTECTED as generation 3: 1 rounds, 101.7 MB in 0.92 s, pause 3.7 ms …`.
fn parse_join(line: &str) -> Option<Join> {
    let generation = number_after(line, "generation ")? as u64;
    Some(Join {
        generation,
        rounds: number_after(line, &format!("generation {generation}: "))?,
        mbytes: number_after(line, "rounds, ")?,
        transfer_s: number_after(line, " MB in ")?,
        pause_ms: number_after(line, "pause ")?,
        pages_at_cut: number_after(line, "(")?,
        capture_ms: number_after(line, "capture ").unwrap_or(f64::NAN),
        harvest_ms: number_after(line, "harvest ").unwrap_or(f64::NAN),
        copy_ms: number_after(line, "copy ").unwrap_or(f64::NAN),
        rejoin_ms: number_after(line, "rejoin ").unwrap_or(f64::NAN),
        header_ms: number_after(line, "header ").unwrap_or(f64::NAN),
        min_share: number_after(line, "lowest vCPU share ").unwrap_or(1.0),
    })
}

fn lines_with(node: &Node, needle: &str) -> Vec<String> {
    node.lines()
        .into_iter()
        .filter(|l| l.contains(needle))
        .collect()
}

/// Waits until `node` printed `n` lines containing `needle`; returns the last.
fn wait_count(node: &Node, needle: &str, n: usize, timeout: Duration) -> anyhow::Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let l = lines_with(node, needle);
        if l.len() >= n {
            return Ok(l[n - 1].clone());
        }
        if Instant::now() > deadline {
            bail!(
                "no {needle:?} line #{n} within {timeout:?}:\n{}",
                node.stderr_text()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The probe: one SET at a time on its own connection, (start, latency µs) per reply.
fn probe(stop: &AtomicBool, samples: &Mutex<Vec<(Instant, f64)>>) {
    let mut conn = None;
    let mut i = 0u64;
    while !stop.load(Ordering::Acquire) {
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match RespConn::connect(Scenario::guest_addr(), Duration::from_secs(5)) {
                Ok(c) => conn.insert(c),
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
            },
        };
        let key = format!("probe-{i}");
        let t = Instant::now();
        match c.command(&[b"SET", key.as_bytes(), b"x"]) {
            Ok(_) => samples
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((t, t.elapsed().as_secs_f64() * 1e6)),
            Err(_) => conn = None,
        }
        i += 1;
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn p99(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 * 0.99).ceil() as usize).clamp(1, v.len()) - 1]
}

/// Runs the benchmark.
pub fn run(opts: &Opts, args: &Args) -> anyhow::Result<()> {
    let runs = args.runs.unwrap_or(if opts.quick { 3 } else { 10 });
    if runs == 0 {
        bail!("--runs must be at least 1");
    }
    let mut rows = Vec::new();
    for g in &args.guest {
        for t in &args.transport {
            rows.push(
                measure(args, (t, g), runs).with_context(|| format!("guest {g}, transport {t}"))?,
            );
        }
    }
    report::print_table(
        "reprotect (a new backup joins the lone primary: kv under load, stream dirtying 24 MiB)",
        &[
            "guest",
            "transport",
            "joins",
            "pause p50 ms",
            "p99 ms",
            "max ms",
            "transfer p50 s",
            "MB p50",
            "rounds p50",
            "min share",
            "client p99 µs during / outside",
            "lost",
        ],
        &rows
            .iter()
            .map(|row| {
                vec![
                    row.guest.clone(),
                    row.transport.clone(),
                    row.runs.to_string(),
                    format!("{:.1}", row.pause_ms_p50),
                    format!("{:.1}", row.pause_ms_p99),
                    format!("{:.1}", row.pause_ms_max),
                    format!("{:.2}", row.transfer_s_p50),
                    format!("{:.1}", row.mbytes_sent_p50),
                    format!("{:.0}", row.rounds_p50),
                    format!("{:.2}", row.min_share),
                    format!(
                        "{:.0} / {:.0}",
                        row.client_p99_us_during, row.client_p99_us_outside
                    ),
                    row.acked_writes_lost.to_string(),
                ]
            })
            .collect::<Vec<_>>(),
    );
    let path = report::write_json(opts, "reprotect", &rows)?;
    let svg = report::plot_svg(
        opts,
        "reprotect",
        &[Panel {
            title: format!(
                "re-protection pause per join ({runs} joins each; kv under load, stream dirtying)"
            ),
            x_label: "join".into(),
            y_label: "ms (guest paused at the cut)".into(),
            series: rows
                .iter()
                .map(|row| Series {
                    label: format!("{} {}", row.guest, row.transport),
                    points: row
                        .joins
                        .iter()
                        .enumerate()
                        .map(|(i, j)| ((i + 1) as f64, j.pause_ms))
                        .collect(),
                })
                .collect(),
            ..Panel::default()
        }],
    )?;
    eprintln!("wrote {} and {}", path.display(), svg.display());
    let lost: u64 = rows.iter().map(|r| r.acked_writes_lost).sum();
    if lost > 0 {
        bail!("{lost} acknowledged writes lost");
    }
    Ok(())
}

/// Kills the backup, then `runs` times: a new backup joins the lone primary, is killed once
/// it replays. Pushes each join's (start, end) to `windows` and its figures to `joins`.
fn join_loop(
    s: &mut Scenario,
    runs: usize,
    windows: &mut Vec<(Instant, Instant)>,
    joins: &mut Vec<Join>,
) -> anyhow::Result<()> {
    s.backup.take().context("backup")?.kill();
    let primary = s.primary.as_ref().context("primary")?;
    wait_count(primary, "ALONE", 1, Duration::from_secs(10))?;
    let bar = report::progress(runs as u64, "reprotect");
    for i in 0..runs {
        std::thread::sleep(Duration::from_millis(500));
        let t0 = Instant::now();
        let mut joiner = s.spawn_joiner(&format!("j{i}"), (7120 + i as u16, JOIN_PORT), &[])?;
        let done = wait_count(
            s.primary.as_ref().context("primary")?,
            "REPROTECTED",
            i + 1,
            Duration::from_secs(60),
        )
        .with_context(|| format!("join {i}: {}", joiner.stderr_text()))?;
        joiner
            .wait_line("replaying from exit", Duration::from_secs(10))
            .with_context(|| format!("join {i}: {}", joiner.stderr_text()))?;
        windows.push((t0, Instant::now()));
        let j = parse_join(&done).with_context(|| format!("cannot parse {done:?}"))?;
        bar.set_message(format!("pause {:.1} ms", j.pause_ms));
        bar.inc(1);
        joins.push(j);
        std::thread::sleep(Duration::from_millis(500));
        joiner.kill();
        wait_count(
            s.primary.as_ref().context("primary")?,
            "ALONE",
            i + 2,
            Duration::from_secs(10),
        )?;
    }
    bar.finish_and_clear();
    Ok(())
}

/// What the kv guest's clients saw: the probe's samples, the load's errors, the read-back.
#[derive(Default)]
struct Clients {
    samples: Vec<(Instant, f64)>,
    errors: u64,
    checked: u64,
    lost: u64,
}

/// kv: the joins under client load and a latency probe; every acknowledged write read back.
fn joins_under_load(
    args: &Args,
    s: &mut Scenario,
    runs: usize,
    (windows, joins): (&mut Vec<(Instant, Instant)>, &mut Vec<Join>),
) -> anyhow::Result<Clients> {
    s.wait_ready(Duration::from_secs(30))?;
    let checker = Arc::new(Checker::default());
    let mut load = Load::start(
        &LoadConfig {
            netns: Some(s.netns().name().to_string()),
            addr: Scenario::guest_addr(),
            threads: args.threads,
            timeout: Duration::from_secs(10),
            prefix: "rp".into(),
        },
        Arc::clone(&checker),
    )?;
    let stop = AtomicBool::new(false);
    let samples = Mutex::new(Vec::new());
    let ns = s.netns().name().to_string();
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let (stop, samples) = (&stop, &samples);
        scope.spawn(move || {
            // This thread only: the probe connects from inside the namespace.
            if ftvm_channel::netns::enter_netns(&ns).is_ok() {
                probe(stop, samples);
            }
        });
        std::thread::sleep(Duration::from_secs(1));
        let result = join_loop(s, runs, windows, joins);
        stop.store(true, Ordering::Release);
        result
    })?;
    let stats = load.stop();
    let check = s
        .in_netns(|| {
            let mut c = RespConn::connect(Scenario::guest_addr(), Duration::from_secs(10))?;
            checker.verify(&mut c)
        })?
        .context("read back the acknowledged writes")?;
    Ok(Clients {
        samples: samples.into_inner().unwrap_or_else(|e| e.into_inner()),
        errors: stats.errors,
        checked: check.checked,
        lost: check.lost,
    })
}

/// One pair of `guest` over `transport`, `runs` joins.
fn measure(args: &Args, (transport, guest): (&str, &str), runs: usize) -> anyhow::Result<Row> {
    let mut cfg = ScenarioConfig::new(crate::ft::ftvm_binary()?, "bench-rp");
    cfg.transport = transport.to_string();
    cfg.log = "info".into();
    // What is measured is the join, not failure detection: a detector that a busy host starves
    // for 200 ms would let the backup take over before the benchmark kills it (seen with the
    // stream guest while builds ran).
    cfg.fail_timeout_ms = Some(1000);
    match guest {
        "kv" => {}
        "stream" => {
            cfg.guest = guest.into();
            cfg.cmdline = Some(STREAM_DIRTY.into());
        }
        other => bail!("--guest {other}: kv or stream"),
    }
    let mut s = Scenario::prepare(cfg)?;
    s.backup = Some(s.spawn(Side::Backup, &[])?);
    s.primary = Some(s.spawn(Side::Primary, &Scenario::accept_join_args())?);
    let mut windows = Vec::new();
    let mut joins = Vec::new();
    let clients = if guest == "kv" {
        joins_under_load(args, &mut s, runs, (&mut windows, &mut joins))?
    } else {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !s.console(Some(Side::Primary)).contains("stream: sink on") {
            if Instant::now() > deadline {
                bail!("the stream guest did not start:\n{}", s.stderr_of_both());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_secs(1));
        join_loop(&mut s, runs, &mut windows, &mut joins)?;
        Clients::default()
    };
    let inside = |t: &Instant| windows.iter().any(|(a, b)| t >= a && t <= b);
    let mut during: Vec<f64> = clients
        .samples
        .iter()
        .filter(|(t, _)| inside(t))
        .map(|(_, us)| *us)
        .collect();
    let mut outside: Vec<f64> = clients
        .samples
        .iter()
        .filter(|(t, _)| !inside(t))
        .map(|(_, us)| *us)
        .collect();
    let col = |f: fn(&Join) -> f64| joins.iter().map(f).collect::<Vec<f64>>();
    let mut pauses = col(|j| j.pause_ms);
    Ok(Row {
        transport: transport.to_string(),
        guest: guest.into(),
        runs: joins.len(),
        pause_ms_p50: report::median(&mut pauses.clone()),
        pause_ms_p99: p99(&mut pauses),
        pause_ms_max: pauses.iter().copied().fold(f64::MIN, f64::max),
        transfer_s_p50: report::median(&mut col(|j| j.transfer_s)),
        mbytes_sent_p50: report::median(&mut col(|j| j.mbytes)),
        rounds_p50: report::median(&mut col(|j| j.rounds)),
        min_share: col(|j| j.min_share).into_iter().fold(1.0, f64::min),
        client_samples_during: during.len(),
        client_p99_us_during: p99(&mut during),
        client_p99_us_outside: p99(&mut outside),
        acked_writes_checked: clients.checked,
        acked_writes_lost: clients.lost,
        client_errors: clients.errors,
        joins,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_primary_s_line_parses() {
        let j = parse_join(
            "primary: REPROTECTED as generation 4: 2 rounds, 101.7 MB in 0.92 s, pause 3.7 ms \
             (208 pages at the cut, exit 23924, log record 1709; lowest vCPU share 0.25; \
             pause: capture 0.4 ms, harvest 1.5 ms, copy 1.1 ms, rejoin 0.2 ms, header 0.1 ms)",
        )
        .expect("parses");
        assert_eq!(j.generation, 4);
        assert_eq!(
            (j.rounds, j.mbytes, j.transfer_s, j.pause_ms, j.min_share),
            (2.0, 101.7, 0.92, 3.7, 0.25)
        );
        assert_eq!(
            (
                j.pages_at_cut,
                j.capture_ms,
                j.harvest_ms,
                j.copy_ms,
                j.rejoin_ms,
                j.header_ms
            ),
            (208.0, 0.4, 1.5, 1.1, 0.2, 0.1)
        );
    }
}
