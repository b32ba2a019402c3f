//! `ft`: the kv guest under `redis-benchmark` SET/GET with fault tolerance off (`ftvm run`)
//! and on (`ftvm primary` + `ftvm backup`, each transport), in one run: throughput, p50/p99
//! latency, the FT/no-FT throughput ratio (the paper's Table 1), logging bandwidth and the
//! output-rule delay, and the CPU time the primary's and the backup's processes took (in cores,
//! over the `redis-benchmark` run: on a 2-core host that is the budget FT competes for) and per
//! request, by thread (vCPU, sender/receiver poller, TAP reader, output releaser: CPU time per
//! request stays meaningful when other work shares the host, throughput does not). Runs the
//! `ftvm` binary next to this one in a network namespace (root).
//!
//! Options: `--transports none,tcp,...` (FT off, `none`, is always measured first), `--runs N`
//! (every run measures each configuration in turn; rows hold the medians), `--requests N`. A
//! transport written `T+shared` (`--transports tcp,tcp+shared`) runs the pair in shared-disk
//! mode: one image, `--shared-disk`, and a file arbiter, so every disk write waits for the
//! backup's ack and passes the disk owner record's fence (`vmm-core/DEVICES.md`); the row's
//! `disk_mode` says which.
//!
//! Loads (`--loads 8x1,50x16`, the default: `CxP` is `redis-benchmark -c C -P P`): every
//! configuration is measured under each load in turn, in one run of its processes; rows carry
//! `clients` and `pipeline`, and the ratio is against FT off under the same load. `8x1` is a
//! light, latency-bound load; `50x16` (50 clients, 16 requests in flight each, `-n` four times
//! `--requests`) the analog of the paper's loaded workloads, where the pair's cost per request
//! and not its round trips bounds throughput. The log bandwidth and output delay come from the
//! primary's report, which covers the whole run (every load).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use ftvm_channel::netns::Netns;
use serde::Serialize;

use crate::report::{self, Panel, Series};
use crate::Opts;

const GUEST_IP: &str = "10.0.2.15";
const TAP: &str = "ftvmtap0";

/// One row of results/ft.json.
#[derive(Debug, Serialize)]
struct Row {
    transport: String,
    /// `redis-benchmark -c`.
    clients: u32,
    /// `redis-benchmark -P` (1: no pipelining).
    pipeline: u32,
    /// `own-copy` (each side its own image; FT off: the one image) or `shared` (`T+shared`).
    disk_mode: &'static str,
    test: String,
    ops_per_s: f64,
    /// Every run's ops/s, in run order (the dispersion the median hides).
    ops_per_s_runs: Vec<f64>,
    p50_us: f64,
    p99_us: f64,
    ratio: f64,
    log_mbit_s: f64,
    output_delay_p50_us: f64,
    output_delay_p99_us: f64,
    /// CPU time of the primary's process (`ftvm run` when FT is off) per second of the run.
    primary_cpu_cores: f64,
    /// CPU time of the backup's process per second of the run (0 when FT is off).
    backup_cpu_cores: f64,
    /// CPU time of the primary's process (`ftvm run` when FT is off) per request of the
    /// `redis-benchmark` run (SET and GET together), in µs: unlike throughput, robust when
    /// other work shares the host.
    primary_us_per_req: f64,
    /// The same for the backup's process (0 when FT is off).
    backup_us_per_req: f64,
    /// The primary's CPU per request by thread name (`ftvm` is the vCPU, `ftvm-log-send` the
    /// channel's sender poller, `tap-rx-*` the TAP reader, `ftvm-output` the output releaser).
    primary_threads_us_per_req: BTreeMap<String, f64>,
    /// The backup's CPU per request by thread name (`ftvm-log-recv` is the receiver poller).
    backup_threads_us_per_req: BTreeMap<String, f64>,
    /// The primary's throttle over the whole run of the configuration (every load): its
    /// smallest CPU share (1: it never throttled; FT off and `--throttle-target-ms 0`: 1).
    throttle_min_share: f64,
    /// The time the primary's throttle spent below a share of 1 over the same run, in ms.
    throttled_ms: f64,
    /// The largest lag of the backup's execution the throttle saw, in ms (0 without one).
    max_lag_ms: f64,
    /// CPU time of the client (`redis-benchmark`) per request, in µs: it shares the host.
    client_us_per_req: f64,
    /// The FT on/off ratio this host allows at most when every core works for this
    /// configuration (primary + backup + client CPU per request) and FT off is held to its
    /// own measured throughput: `nproc × 10⁶ / (µs per request) / FT off's ops/s`, capped at
    /// 1 (see [`host_bound`]). 1 for FT off.
    host_bound_ratio: f64,
    /// What the primary's vCPU thread alone allows, an estimate of the bound where the
    /// backup has cores of its own (separate hosts): FT off's vCPU CPU per request over this
    /// configuration's (the thread `ftvm`; FT off's own vCPU runs at one full core), capped
    /// at 1. 1 for FT off.
    vcpu_bound_ratio: f64,
    runs: usize,
}

/// CPU time of the threads of process `pid` (`/proc/PID/task/*/schedstat`), summed by thread
/// name (`comm`); empty when gone.
fn thread_cpu(pid: u32) -> BTreeMap<String, Duration> {
    let mut by_name = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return by_name;
    };
    for t in tasks.flatten() {
        let ns = std::fs::read_to_string(t.path().join("schedstat"))
            .ok()
            .and_then(|text| text.split_whitespace().next()?.parse::<u64>().ok());
        let name = std::fs::read_to_string(t.path().join("comm"))
            .map(|n| n.trim().to_string())
            .unwrap_or_default();
        if let Some(ns) = ns {
            *by_name.entry(name).or_insert(Duration::ZERO) += Duration::from_nanos(ns);
        }
    }
    by_name
}

/// CPU time of this process's children that have been waited for (`cutime` + `cstime` of
/// `/proc/self/stat`, in USER_HZ ticks: 100 per second in Linux's ABI); the client
/// (`redis-benchmark`, run through `ip netns exec` and `timeout`) counts once it has exited.
fn children_cpu() -> Duration {
    let ticks = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            // Fields after the command name (which may hold spaces) in parentheses.
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            // `rest` starts at field 3 (state): cutime is field 16, cstime field 17.
            Some(f.get(13)?.parse::<u64>().ok()? + f.get(14)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

/// CPU time of every thread of process `pid`; zero when gone.
fn process_cpu(pid: u32) -> Duration {
    thread_cpu(pid).values().sum()
}

/// Per-thread CPU used between two [`thread_cpu`] snapshots, in µs per request.
fn per_request(
    before: &BTreeMap<String, Duration>,
    after: &BTreeMap<String, Duration>,
    requests: u64,
) -> BTreeMap<String, f64> {
    after
        .iter()
        .map(|(name, t)| {
            let t0 = before.get(name).copied().unwrap_or(Duration::ZERO);
            let us = t.saturating_sub(t0).as_secs_f64() * 1e6 / requests.max(1) as f64;
            (name.clone(), us)
        })
        .collect()
}

/// (test, ops/s, p50 µs, p99 µs) of one redis-benchmark test.
type Measured = (String, f64, f64, f64);
/// CPU of one process: cores over the run, and µs per request by thread name.
type Cpu = (f64, BTreeMap<String, f64>);
/// What one load measured: per test (SET, GET) ops/s, p50, p99; the CPU of the primary and
/// of the backup.
/// A load's figures: SET and GET, the primary's and the backup's CPU, the client's CPU per
/// request (µs).
type Loaded = (Vec<Measured>, Cpu, Cpu, f64);
/// What one configuration measured: each load's figures, in the order of the loads; the
/// primary's report.
type One = (Vec<Loaded>, serde_json::Value);

/// One `redis-benchmark` load: (clients, pipeline).
type Load = (u32, u32);

/// `CxP` → (C, P).
fn parse_load(s: &str) -> Result<Load, String> {
    let (c, p) = s
        .split_once('x')
        .ok_or_else(|| format!("{s:?}: expected CLIENTSxPIPELINE, e.g. 50x16"))?;
    let n = |v: &str| {
        v.parse::<u32>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| format!("{s:?}: {v:?} is not a positive number"))
    };
    Ok((n(c)?, n(p)?))
}

/// Requests per test under `load`: pipelined loads get four times as many (they run faster).
fn load_requests((_, pipeline): Load, requests: u64) -> u64 {
    if pipeline > 1 {
        4 * requests
    } else {
        requests
    }
}

/// The `ftvm` binary beside this one (`cargo build --release -p ftvm`).
pub(crate) fn ftvm_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let bin = exe.parent().context("binary directory")?.join("ftvm");
    if !bin.exists() {
        bail!(
            "{} not built (cargo build --release -p ftvm)",
            bin.display()
        );
    }
    Ok(bin)
}

/// (rps, p50 µs, p99 µs) of `test` in redis-benchmark 7 CSV output.
fn parse_csv(csv: &str, test: &str) -> Option<(f64, f64, f64)> {
    csv.lines().find_map(|l| {
        let f: Vec<&str> = l.split(',').map(|c| c.trim_matches('"')).collect();
        if f.first()? != &test || f.len() < 7 {
            return None;
        }
        let n = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok());
        Some((n(1)?, n(4)? * 1000.0, n(6)? * 1000.0))
    })
}

fn wait_exit(mut c: Child, timeout: Duration) -> anyhow::Result<std::process::Output> {
    let start = Instant::now();
    while c.try_wait()?.is_none() {
        if start.elapsed() > timeout {
            let _ = c.kill();
            let out = c.wait_with_output()?;
            bail!(
                "process did not exit: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(c.wait_with_output()?)
}

fn redis(ns: &Netns, args: &[&str]) -> anyhow::Result<std::process::Output> {
    let mut all = vec!["10", "redis-cli", "-h", GUEST_IP];
    all.extend_from_slice(args);
    Ok(ns.exec("timeout", &all)?)
}

/// One configuration: `transport` = "none" (FT off) or a transport name.
fn one(
    ns: &Netns,
    bin: &Path,
    dir: &Path,
    config: &str,
    (loads, requests): (&[Load], u64),
    (primary_args, backup_args): (&[String], &[String]),
) -> anyhow::Result<One> {
    let (transport, shared) = split_config(config);
    for d in ["a.img", "b.img"] {
        std::fs::File::create(dir.join(d))?.set_len(32 << 20)?;
    }
    // Shared disk: a fresh arbiter and owner record per run (a pair starts in generation 1).
    let arbiter = dir.join("arbiter");
    if shared {
        let _ = std::fs::remove_dir_all(&arbiter);
        let _ = std::fs::remove_file(dir.join("a.img.owner"));
        std::fs::create_dir_all(&arbiter)?;
    }
    let cmdline = format!("ip={GUEST_IP}/24 gw=10.0.2.1 port=6379");
    let net = format!("tap:{TAP}");
    let shm = format!("/dev/shm/ftvm-bench-ft-{}", std::process::id());
    let peer = if transport == "shm" {
        shm
    } else {
        "127.0.0.1:7311".to_string()
    };
    let args = |role: &str, disk: &str| -> Vec<String> {
        let mut v = vec![
            role.to_string(),
            "--guest".into(),
            "kv".into(),
            "--mem".into(),
            "64M".into(),
            "--disk".into(),
            dir.join(disk).display().to_string(),
            "--net".into(),
            net.clone(),
            "--cmdline".into(),
            cmdline.clone(),
            "--console".into(),
            dir.join(format!("{role}.console")).display().to_string(),
            "--log".into(),
            "error".into(),
        ];
        if role != "run" {
            v.extend([
                "--peer".into(),
                peer.clone(),
                "--transport".into(),
                transport.into(),
                "--report".into(),
                dir.join(format!("{role}.json")).display().to_string(),
            ]);
            if shared {
                v.extend([
                    "--shared-disk".into(),
                    "--arbiter".into(),
                    format!("file:{}", arbiter.display()),
                ]);
            }
            v.extend_from_slice(if role == "primary" {
                primary_args
            } else {
                backup_args
            });
        } else {
            v.push("--quiet".into());
        }
        v
    };
    let bins = bin.display().to_string();
    let mut children = Vec::new();
    if transport == "none" {
        children.push(
            ns.command(&bins, &args("run", "a.img"))
                .stderr(Stdio::piped())
                .spawn()?,
        );
    } else {
        children.push(
            ns.command(
                &bins,
                &args("backup", if shared { "a.img" } else { "b.img" }),
            )
            .stderr(Stdio::piped())
            .spawn()?,
        );
        children.push(
            ns.command(&bins, &args("primary", "a.img"))
                .stderr(Stdio::piped())
                .spawn()?,
        );
    }
    let start = Instant::now();
    loop {
        let out = redis(ns, &["PING"])?;
        if String::from_utf8_lossy(&out.stdout).trim() == "PONG" {
            break;
        }
        if start.elapsed() > Duration::from_secs(30) {
            let mut why = String::new();
            for mut c in children {
                let _ = c.kill();
                if let Ok(out) = c.wait_with_output() {
                    let err = String::from_utf8_lossy(&out.stderr);
                    let tail: Vec<&str> = err.lines().rev().take(5).collect();
                    for l in tail.into_iter().rev() {
                        why.push_str("\n  ");
                        why.push_str(l);
                    }
                }
            }
            bail!("kv ({config}) did not answer PING; the processes said:{why}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let pids: Vec<u32> = children.iter().map(Child::id).collect();
    let measured: anyhow::Result<Vec<Loaded>> = loads
        .iter()
        .map(|&load| one_load(ns, &pids, load, load_requests(load, requests)))
        .collect();
    let measured = match measured {
        Ok(m) => m,
        Err(e) => {
            for mut c in children {
                let _ = c.kill();
                let _ = c.wait();
            }
            return Err(e);
        }
    };
    let _ = ns.exec("timeout", &["1", "redis-cli", "-h", GUEST_IP, "SHUTDOWN"]);
    let mut outs = Vec::new();
    for c in children.into_iter().rev() {
        outs.push(wait_exit(c, Duration::from_secs(120))?);
    }
    // A pair with an arbiter (`T+shared`) may fail over during the run (a side presumed the
    // other failed): say so, the figures of such a run are not those of a replicated pair.
    for out in &outs {
        for l in String::from_utf8_lossy(&out.stderr).lines() {
            if ["LIVE", "ALONE", "FENCED", "uperseded", "presumed"]
                .iter()
                .any(|k| l.contains(k))
            {
                eprintln!("ft: {config}: {l}");
            }
        }
    }
    let primary = if transport == "none" {
        serde_json::Value::Null
    } else {
        let text = std::fs::read_to_string(dir.join("primary.json"))
            .with_context(|| format!("primary report ({transport})"))?;
        serde_json::from_str(&text)?
    };
    Ok((measured, primary))
}

/// One `redis-benchmark` SET/GET run under `load` against the running configuration whose
/// processes are `pids` (`[run]` or `[backup, primary]`).
fn one_load(ns: &Netns, pids: &[u32], load: Load, requests: u64) -> anyhow::Result<Loaded> {
    let (n, c, p) = (requests.to_string(), load.0.to_string(), load.1.to_string());
    let threads0: Vec<BTreeMap<String, Duration>> = pids.iter().map(|&p| thread_cpu(p)).collect();
    let cpu0: Vec<Duration> = pids.iter().map(|&p| process_cpu(p)).collect();
    let client0 = children_cpu();
    let t0 = Instant::now();
    let out = ns.exec(
        "timeout",
        &[
            "300",
            "redis-benchmark",
            "-h",
            GUEST_IP,
            "-n",
            &n,
            "-c",
            &c,
            "-P",
            &p,
            "-t",
            "set,get",
            "--csv",
        ],
    )?;
    let wall = t0.elapsed().as_secs_f64().max(1e-6);
    let client_us =
        children_cpu().saturating_sub(client0).as_secs_f64() * 1e6 / (2 * requests) as f64;
    let threads: Vec<BTreeMap<String, f64>> = pids
        .iter()
        .zip(&threads0)
        // SET and GET: two runs of `requests` each.
        .map(|(&p, t0)| per_request(t0, &thread_cpu(p), 2 * requests))
        .collect();
    let cores: Vec<f64> = pids
        .iter()
        .zip(&cpu0)
        .map(|(&p, c0)| process_cpu(p).saturating_sub(*c0).as_secs_f64() / wall)
        .collect();
    let cpu: Vec<Cpu> = cores.into_iter().zip(threads).collect();
    let (primary_cpu, backup_cpu) = match cpu.as_slice() {
        [run] => (run.clone(), Cpu::default()),
        [backup, primary] => (primary.clone(), backup.clone()),
        _ => Default::default(),
    };
    let csv = String::from_utf8_lossy(&out.stdout).to_string();
    let mut rows = Vec::new();
    for test in ["SET", "GET"] {
        let (rps, p50, p99) =
            parse_csv(&csv, test).ok_or_else(|| anyhow!("no {test} row in: {csv}"))?;
        rows.push((test.to_string(), rps, p50, p99));
    }
    Ok((rows, primary_cpu, backup_cpu, client_us))
}

/// The highest FT on/off ratio the host's cores allow: a configuration that needs `us_per_req`
/// µs of CPU per request in all (both sides and the client) can serve at most
/// `nproc × 10⁶ / us_per_req` requests per second, whatever it does with them; divided by FT
/// off's measured `base_ops` (ops/s), capped at 1. Where primary and backup share a host (as
/// here) this bounds the ratio below what separate hosts would give.
fn host_bound(us_per_req: f64, base_ops: f64) -> f64 {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    if us_per_req <= 0.0 || base_ops <= 0.0 {
        return 1.0;
    }
    (cores * 1e6 / us_per_req / base_ops).min(1.0)
}

/// `T+shared` → (`T`, shared-disk mode); `T` → (`T`, own copies).
fn split_config(config: &str) -> (&str, bool) {
    match config.strip_suffix("+shared") {
        Some(t) => (t, true),
        None => (config, false),
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Options of `ftvm-bench ft`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// FT transports to measure against FT off (`none`, always measured), comma-separated
    /// [default: tcp,tcp-spin,uring,shm].
    #[arg(long, value_delimiter = ',')]
    pub transports: Option<Vec<String>>,
    /// Runs; each row reports the medians over them.
    #[arg(long, default_value_t = 1)]
    pub runs: usize,
    /// redis-benchmark requests per test [default: 50000, 5000 with --quick] (pipelined loads:
    /// four times as many).
    #[arg(long)]
    pub requests: Option<u64>,
    /// redis-benchmark loads, `CLIENTSxPIPELINE` (`-c`, `-P`), comma-separated: each
    /// configuration runs each load in turn.
    #[arg(long, value_delimiter = ',', value_parser = parse_load, default_value = "8x1,50x16")]
    pub loads: Vec<Load>,
    /// An extra argument for the primary of every FT pair (repeatable, e.g.
    /// `--primary-arg=--throttle-target-ms --primary-arg=0`), for tuning experiments; the
    /// results' header (`command`) records them.
    #[arg(long = "primary-arg", allow_hyphen_values = true)]
    pub primary_args: Vec<String>,
    /// An extra argument for the backup of every FT pair (repeatable), as `--primary-arg`.
    #[arg(long = "backup-arg", allow_hyphen_values = true)]
    pub backup_args: Vec<String>,
}

/// Entry point.
///
/// # Errors
/// Not root, redis-benchmark or the ftvm binary missing, a run failing.
pub fn run(opts: &Opts, args: &Args) -> anyhow::Result<()> {
    ftvm_channel::netns::require_root().map_err(|r| anyhow!(r))?;
    let bin = ftvm_binary()?;
    let requests: u64 = args
        .requests
        .unwrap_or(if opts.quick { 5_000 } else { 50_000 })
        .max(1);
    let transports: Vec<String> = std::iter::once("none".to_string())
        .chain(
            args.transports
                .clone()
                .unwrap_or_else(|| {
                    ["tcp", "tcp-spin", "uring", "shm"]
                        .map(String::from)
                        .to_vec()
                })
                .into_iter()
                .filter(|t| t != "none" && !t.is_empty()),
        )
        .collect();
    let runs = args.runs.max(1);
    let dir = std::env::temp_dir().join(format!("ftvm-bench-ft-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let ns = Netns::create(&format!("ftvm-bench-ft-{}", std::process::id()))?;
    ns.add_tap(TAP, Some((std::net::Ipv4Addr::new(10, 0, 2, 1), 24)))?;
    let loads = args.loads.clone();
    // A cell is one (transport, load): cell `ti * loads.len() + li`.
    let cells = transports.len() * loads.len();
    // samples[cell][test] = one value vector per column, over the runs.
    type Samples = [Vec<f64>; 14];
    let mut samples: Vec<[Samples; 2]> = (0..cells).map(|_| Default::default()).collect();
    // threads[cell][role] = per thread name, µs per request over the runs.
    type ThreadSamples = BTreeMap<String, Vec<f64>>;
    let mut threads: Vec<[ThreadSamples; 2]> = (0..cells).map(|_| Default::default()).collect();
    let mut tests = [String::new(), String::new()];
    for run in 0..runs {
        for (ti, t) in transports.iter().enumerate() {
            eprintln!("ft: run {}/{runs}: kv with FT {t} ...", run + 1);
            let (measured, primary) = one(
                &ns,
                &bin,
                &dir,
                t,
                (&loads, requests),
                (&args.primary_args, &args.backup_args),
            )?;
            let f = |k: &str| primary.get(k).and_then(|v| v.as_f64()).unwrap_or(0.0);
            let throttle = |k: &str, off: f64| primary["throttle"][k].as_f64().unwrap_or(off);
            for (li, (r, (pc, pt), (bc, bt), client_us)) in measured.into_iter().enumerate() {
                let cell = ti * loads.len() + li;
                // (A float sum of nothing is -0.0.)
                let total = |m: &BTreeMap<String, f64>| m.values().fold(0.0, |a, b| a + b);
                let (pu, bu) = (total(&pt), total(&bt));
                for (role, per_thread) in [pt, bt].into_iter().enumerate() {
                    for (name, us) in per_thread {
                        threads[cell][role].entry(name).or_default().push(us);
                    }
                }
                for (i, (test, rps, p50, p99)) in r.into_iter().enumerate().take(2) {
                    tests[i] = test;
                    let values = [
                        rps,
                        p50,
                        p99,
                        f("log_mbit_s"),
                        f("output_delay_p50_us"),
                        f("output_delay_p99_us"),
                        pc,
                        bc,
                        pu,
                        bu,
                        throttle("min_share", 1.0),
                        throttle("throttled_ms", 0.0),
                        throttle("max_lag_ms", 0.0),
                        client_us,
                    ];
                    for (k, v) in values.into_iter().enumerate() {
                        samples[cell][i][k].push(v);
                    }
                }
            }
        }
    }
    let mut rows: Vec<Row> = Vec::new();
    // base[load][test]: FT off's ops/s.
    let mut base = vec![[0.0f64; 2]; loads.len()];
    // base_vcpu[load]: FT off's vCPU thread, µs per request.
    let mut base_vcpu = vec![0.0f64; loads.len()];
    for (cell, (t, (li, &(clients, pipeline)))) in transports
        .iter()
        .flat_map(|t| std::iter::repeat(t).zip(loads.iter().enumerate()))
        .enumerate()
    {
        let [pt, bt] = threads[cell].clone().map(|by_name| {
            by_name
                .into_iter()
                // Threads seen in only some runs (a short-lived helper) count 0 in the others.
                .map(|(name, mut v)| {
                    v.resize(runs.max(v.len()), 0.0);
                    (name, median(&mut v))
                })
                .collect::<BTreeMap<String, f64>>()
        });
        for i in 0..2 {
            let mut m = samples[cell][i].clone().map(|mut v| median(&mut v));
            if t == "none" {
                base[li][i] = m[0];
                base_vcpu[li] = pt.get("ftvm").copied().unwrap_or(0.0);
                m[4] = 0.0;
                m[5] = 0.0;
            }
            rows.push(Row {
                transport: t.clone(),
                clients,
                pipeline,
                disk_mode: if split_config(t).1 {
                    "shared"
                } else {
                    "own-copy"
                },
                test: tests[i].clone(),
                ops_per_s: m[0],
                ops_per_s_runs: samples[cell][i][0].clone(),
                p50_us: m[1],
                p99_us: m[2],
                ratio: if base[li][i] > 0.0 {
                    m[0] / base[li][i]
                } else {
                    0.0
                },
                log_mbit_s: m[3],
                output_delay_p50_us: m[4],
                output_delay_p99_us: m[5],
                primary_cpu_cores: m[6],
                backup_cpu_cores: m[7],
                primary_us_per_req: m[8],
                backup_us_per_req: m[9],
                primary_threads_us_per_req: pt.clone(),
                backup_threads_us_per_req: bt.clone(),
                throttle_min_share: m[10],
                throttled_ms: m[11],
                max_lag_ms: m[12],
                client_us_per_req: m[13],
                host_bound_ratio: host_bound(m[8] + m[9] + m[13], base[li][i]),
                vcpu_bound_ratio: match pt.get("ftvm") {
                    Some(&us) if us > 0.0 && base_vcpu[li] > 0.0 => (base_vcpu[li] / us).min(1.0),
                    _ => 1.0,
                },
                runs,
            });
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.transport.clone(),
                format!("{}x{}", r.clients, r.pipeline),
                r.test.clone(),
                format!("{:.0}", r.ops_per_s),
                format!("{:.0}", r.p50_us),
                format!("{:.0}", r.p99_us),
                format!("{:.2}", r.ratio),
                format!("{:.2}", r.log_mbit_s),
                format!("{:.0}", r.output_delay_p50_us),
                format!("{:.2}", r.primary_cpu_cores),
                format!("{:.2}", r.backup_cpu_cores),
                format!("{:.0}", r.primary_us_per_req),
                format!("{:.0}", r.backup_us_per_req),
                format!("{:.1}", r.client_us_per_req),
                format!("{:.2}", r.host_bound_ratio),
                format!("{:.2}", r.vcpu_bound_ratio),
            ]
        })
        .collect();
    report::print_table(
        &format!(
            "kv under redis-benchmark -n {requests} (×4 pipelined), load = clients x pipeline, \
             FT off vs on (medians of {runs} runs)"
        ),
        &[
            "transport",
            "load",
            "test",
            "ops/s",
            "p50 µs",
            "p99 µs",
            "ratio",
            "log Mbit/s",
            "out delay p50 µs",
            "primary cores",
            "backup cores",
            "primary µs/req",
            "backup µs/req",
            "client µs/req",
            "host bound",
            "vCPU bound",
        ],
        &table,
    );
    // Where each side's CPU goes, per request (medians; SET and GET together).
    for r in rows.iter().filter(|r| r.test == tests[0]) {
        let show = |m: &BTreeMap<String, f64>| {
            let mut v: Vec<(&String, &f64)> = m.iter().filter(|(_, us)| **us >= 0.05).collect();
            v.sort_by(|a, b| b.1.total_cmp(a.1));
            v.iter()
                .map(|(n, us)| format!("{n} {us:.1}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        eprintln!(
            "{:>9} {:>5} µs/request by thread: primary [{}]{}",
            r.transport,
            format!("{}x{}", r.clients, r.pipeline),
            show(&r.primary_threads_us_per_req),
            if r.transport == "none" {
                String::new()
            } else {
                format!(
                    "; backup [{}]; throttle: min share {:.2}, below 1 for {:.0} ms, max lag {:.0} ms",
                    show(&r.backup_threads_us_per_req),
                    r.throttle_min_share,
                    r.throttled_ms,
                    r.max_lag_ms
                )
            }
        );
    }
    let path = report::write_json(opts, "ft", &rows)?;
    let svg = plot(opts, &serde_json::to_value(&rows)?, None)?;
    eprintln!("wrote {} and {}", path.display(), svg.display());
    Ok(())
}

/// The ft plot from the results' rows (JSON, as written): SET and GET throughput and p99
/// latency per configuration (FT off, then each transport, `+shared` for shared-disk mode) as
/// named bars; `stamp`: the results file's revision and date (`None`: now).
///
/// # Errors
/// The plot cannot be written.
pub fn plot(
    opts: &Opts,
    rows: &serde_json::Value,
    stamp: Option<&str>,
) -> anyhow::Result<std::path::PathBuf> {
    let rows = rows.as_array().map(Vec::as_slice).unwrap_or_default();
    let config = |r: &serde_json::Value| {
        let t = r["transport"].as_str().unwrap_or("?");
        let c = match (t, r["disk_mode"].as_str()) {
            ("none", _) => "FT off".to_string(),
            (t, Some("shared")) => format!("{t}+shared"),
            (t, _) => t.to_string(),
        };
        // Rows before loads were measured (no `pipeline`) are the unpipelined load.
        match (r["clients"].as_u64(), r["pipeline"].as_u64()) {
            (Some(n), Some(p)) if p > 1 => format!("{c} {n}x{p}"),
            _ => c,
        }
    };
    let mut configs: Vec<String> = Vec::new();
    for r in rows {
        let c = config(r);
        if !configs.contains(&c) {
            configs.push(c);
        }
    }
    let series = |test: &str, key: &str| Series {
        label: test.to_string(),
        points: rows
            .iter()
            .filter(|r| r["test"] == test)
            .filter_map(|r| {
                let i = configs.iter().position(|c| *c == config(r))?;
                Some((i as f64, r[key].as_f64()?))
            })
            .collect(),
    };
    let panels = [
        Panel {
            title: "kv under redis-benchmark: ops/s".into(),
            x_label: "configuration".into(),
            y_label: "ops/s".into(),
            categories: configs.clone(),
            series: vec![series("SET", "ops_per_s"), series("GET", "ops_per_s")],
            ..Default::default()
        },
        Panel {
            title: "p99 latency".into(),
            x_label: "configuration".into(),
            y_label: "µs".into(),
            series: vec![series("SET", "p99_us"), series("GET", "p99_us")],
            categories: configs.clone(),
            ..Default::default()
        },
    ];
    report::plot_any(opts, "ft", &panels, stamp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_bound_is_the_cores_over_the_cpu_per_request() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        // 20 µs per request on `cores` cores: cores × 50 000 requests per second at most.
        let at_most = cores * 50_000.0;
        assert!((host_bound(20.0, at_most * 2.0) - 0.5).abs() < 1e-9);
        assert_eq!(host_bound(20.0, at_most / 2.0), 1.0, "capped at 1");
        assert_eq!(host_bound(0.0, 1000.0), 1.0, "nothing measured");
        assert!(host_bound(30.0, at_most) < host_bound(20.0, at_most));
    }

    #[test]
    fn children_cpu_counts_a_waited_child() {
        let before = children_cpu();
        // About 0.3 s of CPU in a child, then waited for.
        let st = std::process::Command::new("sh")
            .args(["-c", "i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done"])
            .status()
            .expect("sh");
        assert!(st.success());
        let used = children_cpu().saturating_sub(before);
        assert!(used >= Duration::from_millis(50), "counted {used:?}");
    }

    #[test]
    fn shared_suffix_selects_the_shared_disk_mode() {
        assert_eq!(split_config("tcp+shared"), ("tcp", true));
        assert_eq!(split_config("shm"), ("shm", false));
        assert_eq!(split_config("none"), ("none", false));
    }

    #[test]
    fn parses_loads() {
        assert_eq!(parse_load("50x16"), Ok((50, 16)));
        assert!(parse_load("50").is_err());
        assert!(parse_load("0x16").is_err());
        assert_eq!(load_requests((50, 16), 1000), 4000);
        assert_eq!(load_requests((8, 1), 1000), 1000);
    }

    #[test]
    fn parses_redis_benchmark_7_csv() {
        let csv = "\"test\",\"rps\",\"avg_latency_ms\",\"min_latency_ms\",\"p50_latency_ms\",\"p95_latency_ms\",\"p99_latency_ms\",\"max_latency_ms\"\n\"SET\",\"1000.00\",\"1.0\",\"0.1\",\"0.900\",\"2.0\",\"3.500\",\"9.0\"\n";
        assert_eq!(parse_csv(csv, "SET"), Some((1000.0, 900.0, 3500.0)));
        assert_eq!(parse_csv(csv, "GET"), None);
    }

    #[test]
    fn per_request_cpu_by_thread() {
        let ms = Duration::from_millis;
        let before = BTreeMap::from([("ftvm".to_string(), ms(100))]);
        let after = BTreeMap::from([
            ("ftvm".to_string(), ms(300)),
            ("ftvm-log-send".to_string(), ms(50)),
        ]);
        let us = per_request(&before, &after, 1000);
        assert_eq!(us.len(), 2);
        assert!((us["ftvm"] - 200.0).abs() < 1e-9, "{us:?}");
        // A thread started during the run counts from zero.
        assert!((us["ftvm-log-send"] - 50.0).abs() < 1e-9, "{us:?}");
        // This process has a thread of its own, with some CPU time.
        assert!(thread_cpu(std::process::id()).values().sum::<Duration>() > Duration::ZERO);
    }
}
