//! `channel`: every transport side by side over loopback, through the full reliability layer.
//!
//! For each transport (`shm`, `tcp`, `tcp-spin`, `uring`) a primary thread pinned to core 0
//! and a backup thread pinned to core 1 each drive their end's state machine
//! ([`ftvm_channel::Sender`] / [`ftvm_channel::Receiver`]) in their own loop — one busy thread
//! per side, which is the whole 2-core budget — and the backup drains its log buffer, reading
//! every record (`black_box`):
//! - (a) round trip of one 64 B record: commit in the primary's log buffer → framed, sent,
//!   checked, committed in the backup's log buffer → acknowledged → the primary sees
//!   `acked_seq` cover it. hdrhistogram p50 / p99 / p99.9.
//! - (b) streaming throughput of 1 KiB records: the primary appends as fast as the window
//!   allows; time from the first append to the acknowledgement of the last.
//!
//! Options: `--transports shm,uring` measures a subset; `--runs N` measures every transport N
//! times, interleaved, and reports medians (with each run's streaming figure); `--only rtt` /
//! `--only stream` measures one of the two. Environment: `FTVM_URING_ASYNC=<bytes>|off` sets
//! the uring transport's `async_send_min` (sends of at least that size go to an io-wq worker;
//! `off`: all inline), `FTVM_URING_WORKER_CPU=<core>` pins those workers.
//!
//! The blocking `tcp` mode sleeps in `poll(2)` when idle (the classic design); the others spin.
//! Output: `results/channel.json`, `results/channel.svg`.

use std::hint::black_box;
use std::net::TcpListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use ftvm_channel::shm::ShmTransport;
use ftvm_channel::tcp::{TcpMode, TcpTransport};
use ftvm_channel::uring::{UringConfig, UringTransport};
use ftvm_channel::{Config, Receiver, Sender, Transport};
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::report::{self, Panel, Series};
use crate::Opts;

const TRANSPORTS: [&str; 4] = ["shm", "tcp", "tcp-spin", "uring"];
// [xdp] With feature `xdp` (root): AF_XDP, and the TCP transports again over the same veth pair
// between two network namespaces, so that they compare over one network path.
#[cfg(feature = "xdp")]
const VETH_TRANSPORTS: [&str; 4] = ["tcp@veth", "tcp-spin@veth", "uring@veth", "xdp"];
const RTT_SIZE: usize = 64;
const STREAM_SIZE: usize = 1024;
const BUF_CAP: usize = 16 << 20;

/// One row of `results/channel.json`.
#[derive(Debug, Clone, Serialize)]
struct Row {
    transport: String,
    rtt_record_bytes: usize,
    rtt_samples: u64,
    rtt_p50_ns: f64,
    rtt_p99_ns: f64,
    rtt_p999_ns: f64,
    rtt_p50_vs_tcp: f64,
    stream_record_bytes: usize,
    stream_records: u64,
    mrecords_per_s: f64,
    gbytes_per_s: f64,
    stream_vs_tcp: f64,
    /// Streaming figure of each run (the row reports the median; `--runs N`).
    stream_mrecords_per_s_runs: Vec<f64>,
    /// How many runs the medians are taken over.
    runs: usize,
    /// Retransmit timeouts, summed over the runs.
    retransmit_timeouts: u64,
    /// 1-minute load average when this transport's runs started, averaged over the runs (the
    /// machine is shared).
    load_average_1m: f64,
}

fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0.0)
}

/// Median of `v` (0 when empty); the mean of the two middle values for an even count.
fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn pin(core: usize) {
    let _ = core_affinity::set_for_current(core_affinity::CoreId { id: core });
}

/// Both ends of a fresh link of `kind`.
fn link(kind: &str, tag: &str) -> anyhow::Result<(Box<dyn Transport>, Box<dyn Transport>)> {
    Ok(match kind {
        "shm" => {
            let prefix = PathBuf::from(format!("/dev/shm/ftvm-bench-{}-{tag}", std::process::id()));
            let a = ShmTransport::create(&prefix, 4 << 20)?;
            let b = ShmTransport::open(&prefix, Duration::from_secs(5))?;
            (Box::new(a), Box::new(b))
        }
        "tcp" | "tcp-spin" | "uring" => {
            let l = TcpListener::bind("127.0.0.1:0")?;
            let addr = l.local_addr()?;
            let a = std::net::TcpStream::connect(addr)?;
            let (b, _) = l.accept()?;
            if kind == "uring" {
                let mut cfg = UringConfig::default();
                if let Ok(v) = std::env::var("FTVM_URING_ASYNC") {
                    cfg.async_send_min = v.parse().ok();
                }
                if let Ok(v) = std::env::var("FTVM_URING_WORKER_CPU") {
                    cfg.worker_cpu = v.parse().ok();
                }
                (
                    Box::new(UringTransport::from_stream(a, cfg)?),
                    Box::new(UringTransport::from_stream(b, cfg)?),
                )
            } else {
                let mode = if kind == "tcp" {
                    TcpMode::Blocking
                } else {
                    TcpMode::Spin
                };
                (
                    Box::new(TcpTransport::from_stream(a, mode)?),
                    Box::new(TcpTransport::from_stream(b, mode)?),
                )
            }
        }
        // [xdp] veth rows: fresh namespaces per link, deleted when both ends are dropped.
        #[cfg(feature = "xdp")]
        k if k == "xdp" || k.ends_with("@veth") => {
            ftvm_channel::xdp::veth::veth_link(k.trim_end_matches("@veth"), &format!("fb-{tag}"))?
        }
        other => return Err(anyhow!("unknown transport {other}")),
    })
}

/// Runs the backup loop until `stop` records arrived; reads every record.
fn backup_loop(
    mut r: Receiver,
    mut c: ftvm_ringbuf::Consumer,
    last: u64,
) -> anyhow::Result<(u64, Receiver)> {
    pin(1);
    let mut sum = 0u64;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        r.poll()?;
        let batch = c.read();
        if !batch.is_empty() {
            let mut done = false;
            for rec in batch.records() {
                let rec = rec.map_err(|e| anyhow!("{e}"))?;
                let p = black_box(rec.payload());
                sum = sum.wrapping_add(u64::from(p[0]) + u64::from(p[p.len() - 1]));
                done = rec.seq() >= last;
            }
            batch.release();
            if done {
                // Let the final ack go out.
                for _ in 0..1000 {
                    r.poll()?;
                }
                return Ok((sum, r));
            }
        }
        if Instant::now() > deadline {
            return Err(anyhow!("backup timed out"));
        }
    }
}

struct Measured {
    rtt: Histogram<u64>,
    mrps: f64,
    gbps: f64,
    timeouts: u64,
}

fn measure(kind: &str, rtt_samples: u64, stream_records: u64) -> anyhow::Result<Measured> {
    let cfg = Config::default();
    let mut hist = Histogram::<u64>::new_with_bounds(10, 10_000_000_000, 3)?;
    let mut timeouts = 0;
    if rtt_samples > 0 {
        timeouts += measure_rtt(kind, rtt_samples, &cfg, &mut hist)?;
    }
    let mut mrps = 0.0;
    if stream_records > 0 {
        let (m, t) = measure_stream(kind, stream_records, &cfg)?;
        mrps = m;
        timeouts += t;
    }
    Ok(Measured {
        rtt: hist,
        mrps,
        gbps: mrps * 1e6 * STREAM_SIZE as f64 / 1e9,
        timeouts,
    })
}

/// (a) Round trip of one record to its ack; returns the retransmit timeouts.
fn measure_rtt(
    kind: &str,
    rtt_samples: u64,
    cfg: &Config,
    hist: &mut Histogram<u64>,
) -> anyhow::Result<u64> {
    let (ta, tb) = link(kind, "rtt")?;
    let (mut tx_p, tx_c) = ftvm_ringbuf::with_capacity(BUF_CAP).map_err(|e| anyhow!("{e}"))?;
    let bcfg = cfg.clone();
    let warm = rtt_samples / 10;
    let total = rtt_samples + warm;
    let backup = std::thread::spawn(move || -> anyhow::Result<(u64, Receiver)> {
        let (p, c) = ftvm_ringbuf::with_capacity(BUF_CAP).map_err(|e| anyhow!("{e}"))?;
        let r = Receiver::accept(tb, p, bcfg)?;
        backup_loop(r, c, total)
    });
    pin(0);
    let mut s = Sender::connect(ta, tx_c, tx_p.next_seq(), cfg.clone())?;
    let payload = [0x5Au8; RTT_SIZE];
    for i in 1..=total {
        let t0 = Instant::now();
        let seq = tx_p.push(1, &payload).map_err(|e| anyhow!("{e}"))?;
        while s.acked_seq() < seq {
            s.poll()?;
        }
        let ns = t0.elapsed().as_nanos() as u64;
        if i > warm {
            hist.record(ns.max(10))?;
        }
    }
    // The backup's end is dropped only after the primary saw its last ack.
    let (_, r) = backup.join().map_err(|_| anyhow!("backup panicked"))??;
    drop(r);
    Ok(s.shared().stats.snapshot().retransmit_timeouts)
}

/// (b) Streaming throughput of 1 KiB records: returns (million records/s, retransmit timeouts).
fn measure_stream(kind: &str, stream_records: u64, cfg: &Config) -> anyhow::Result<(f64, u64)> {
    let (ta, tb) = link(kind, "stream")?;
    let (mut tx_p, tx_c) = ftvm_ringbuf::with_capacity(BUF_CAP).map_err(|e| anyhow!("{e}"))?;
    let bcfg = cfg.clone();
    let backup = std::thread::spawn(move || -> anyhow::Result<(u64, Receiver)> {
        let (p, c) = ftvm_ringbuf::with_capacity(BUF_CAP).map_err(|e| anyhow!("{e}"))?;
        let r = Receiver::accept(tb, p, bcfg)?;
        backup_loop(r, c, stream_records)
    });
    pin(0);
    let mut s = Sender::connect(ta, tx_c, tx_p.next_seq(), cfg.clone())?;
    let template = vec![0xA5u8; STREAM_SIZE];
    let t0 = Instant::now();
    let mut next = 1u64;
    while s.acked_seq() < stream_records {
        // Append up to a batch, then let the sender work.
        let mut k = 0;
        while next <= stream_records && k < 64 {
            match tx_p.claim(1, STREAM_SIZE) {
                Ok(mut c) => {
                    c.copy_from_slice(&template);
                    c[..8].copy_from_slice(&next.to_le_bytes());
                    c.commit();
                    next += 1;
                    k += 1;
                }
                Err(_) => break,
            }
        }
        s.poll()?;
    }
    let secs = t0.elapsed().as_secs_f64();
    let (_, r) = backup.join().map_err(|_| anyhow!("backup panicked"))??;
    drop(r);
    let timeouts = s.shared().stats.snapshot().retransmit_timeouts;
    Ok((stream_records as f64 / secs / 1e6, timeouts))
}

/// Which half of the benchmark to run (`--only`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Only {
    /// 64 B round trips to the acknowledgement.
    Rtt,
    /// 1 KiB streaming throughput.
    Stream,
}

/// Options of `ftvm-bench channel`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Transports to measure, comma-separated [default: every one this build and host can run:
    /// shm, tcp-spin, tcp, uring, and as root the veth/xdp rows].
    #[arg(long, value_delimiter = ',')]
    pub transports: Option<Vec<String>>,
    /// Runs; each row reports the medians over them.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(usize))]
    pub runs: usize,
    /// Only the round trips or only the streaming.
    #[arg(long, value_enum)]
    pub only: Option<Only>,
}

/// Entry point.
pub fn run(opts: &Opts, args: &Args) -> anyhow::Result<()> {
    let (mut rtt_samples, mut stream_records) = if opts.quick {
        (20_000u64, 300_000u64)
    } else {
        (100_000, 2_000_000)
    };
    let mut only: Vec<String> = TRANSPORTS.iter().map(|s| s.to_string()).collect();
    // [xdp] The veth rows need root (namespaces, AF_XDP).
    #[cfg(feature = "xdp")]
    match ftvm_channel::netns::require_root() {
        Ok(()) => only.extend(VETH_TRANSPORTS.iter().map(|s| s.to_string())),
        Err(reason) => eprintln!("channel: no veth/xdp rows: {reason}"),
    }
    if let Some(list) = &args.transports {
        only = list.clone();
    }
    let runs = args.runs.max(1);
    match args.only {
        Some(Only::Rtt) => stream_records = 0,
        Some(Only::Stream) => rtt_samples = 0,
        None => {}
    }
    // Every run measures each transport in turn (so that a change in the machine's load hits
    // all of them alike); each row reports the medians over the runs.
    let mut per: Vec<(Vec<Measured>, f64)> = only.iter().map(|_| (Vec::new(), 0.0)).collect();
    for run in 0..runs {
        for (i, kind) in only.iter().enumerate() {
            // The blocking mode costs ~60-100 µs per round trip: fewer samples keep it short.
            let samples = if kind == "tcp" {
                rtt_samples / 4
            } else {
                rtt_samples
            };
            eprintln!("channel: {kind} (run {}/{runs}) ...", run + 1);
            per[i].1 += load_average() / runs as f64;
            // In a thread of its own: the pinning stays there (the header reads the process's
            // available parallelism from this thread).
            let k = kind.clone();
            let m = std::thread::spawn(move || measure(&k, samples, stream_records))
                .join()
                .map_err(|_| anyhow!("measurement thread panicked"))?
                .with_context(|| format!("transport {kind}"))?;
            per[i].0.push(m);
        }
    }
    let mut rows: Vec<Row> = Vec::new();
    for (kind, (ms, load)) in only.iter().zip(per) {
        let samples = if kind == "tcp" {
            rtt_samples / 4
        } else {
            rtt_samples
        };
        let q = |f: &dyn Fn(&Measured) -> f64| median(ms.iter().map(f).collect());
        let mrps = q(&|m| m.mrps);
        rows.push(Row {
            transport: kind.clone(),
            rtt_record_bytes: RTT_SIZE,
            rtt_samples: samples,
            rtt_p50_ns: q(&|m| m.rtt.value_at_quantile(0.5) as f64),
            rtt_p99_ns: q(&|m| m.rtt.value_at_quantile(0.99) as f64),
            rtt_p999_ns: q(&|m| m.rtt.value_at_quantile(0.999) as f64),
            rtt_p50_vs_tcp: 0.0,
            stream_record_bytes: STREAM_SIZE,
            stream_records,
            mrecords_per_s: mrps,
            gbytes_per_s: q(&|m| m.gbps),
            stream_vs_tcp: 0.0,
            stream_mrecords_per_s_runs: ms.iter().map(|m| m.mrps).collect(),
            runs,
            retransmit_timeouts: ms.iter().map(|m| m.timeouts).sum(),
            load_average_1m: load,
        });
    }
    let tcp = rows.iter().find(|r| r.transport == "tcp").cloned();
    if let Some(tcp) = tcp {
        for r in &mut rows {
            r.rtt_p50_vs_tcp = tcp.rtt_p50_ns / r.rtt_p50_ns.max(1.0);
            r.stream_vs_tcp = r.mrecords_per_s / tcp.mrecords_per_s.max(1e-9);
        }
    }
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.transport.clone(),
                format!("{:.2}", r.rtt_p50_ns / 1e3),
                format!("{:.2}", r.rtt_p99_ns / 1e3),
                format!("{:.2}", r.rtt_p999_ns / 1e3),
                format!("{:.1}x", r.rtt_p50_vs_tcp),
                format!("{:.3}", r.mrecords_per_s),
                format!("{:.3}", r.gbytes_per_s),
                format!("{:.2}x", r.stream_vs_tcp),
                r.retransmit_timeouts.to_string(),
            ]
        })
        .collect();
    report::print_table(
        "channel: 64 B round trip to ack (µs) and 1 KiB streaming, loopback, 2 cores",
        &[
            "transport",
            "p50",
            "p99",
            "p99.9",
            "p50 vs tcp",
            "Mrec/s",
            "GB/s",
            "vs tcp",
            "RTOs",
        ],
        &table,
    );
    // [xdp] The AF_XDP acceptance figures: against tcp-spin over the same veth pair.
    #[cfg(feature = "xdp")]
    if let (Some(x), Some(t)) = (
        rows.iter().find(|r| r.transport == "xdp"),
        rows.iter().find(|r| r.transport == "tcp-spin@veth"),
    ) {
        eprintln!(
            "xdp vs tcp-spin over the same veth pair: p50 RTT {:.2} vs {:.2} µs ({:.2}x); \
             1 KiB streaming {:.3} GB/s, {} RTOs",
            x.rtt_p50_ns / 1e3,
            t.rtt_p50_ns / 1e3,
            x.rtt_p50_ns / t.rtt_p50_ns.max(1.0),
            x.gbytes_per_s,
            x.retransmit_timeouts
        );
    }
    let path = report::write_json(opts, "channel", &rows)?;
    eprintln!("wrote {}", path.display());
    let plot = plot(opts, &serde_json::to_value(&rows)?, None)?;
    eprintln!("wrote {}", plot.display());
    Ok(())
}

/// The channel plot from the results' rows (JSON, as written): RTT percentiles per transport
/// on a log axis (shm and tcp are two decades apart), streaming throughput per transport;
/// `stamp`: the results file's revision and date (`None`: now).
///
/// # Errors
/// The plot cannot be written.
pub fn plot(
    opts: &Opts,
    rows: &serde_json::Value,
    stamp: Option<&str>,
) -> anyhow::Result<std::path::PathBuf> {
    let rows = rows.as_array().map(Vec::as_slice).unwrap_or_default();
    let f = |r: &serde_json::Value, k: &str| r[k].as_f64().unwrap_or(0.0);
    let names: Vec<String> = rows
        .iter()
        .map(|r| r["transport"].as_str().unwrap_or("?").to_string())
        .collect();
    let pct = |label: &str, key: &str| Series {
        label: label.into(),
        points: rows
            .iter()
            .enumerate()
            .map(|(i, r)| (i as f64, f(r, key) / 1e3))
            .collect(),
    };
    let panels = [
        Panel {
            title: "64 B record → ack round trip".into(),
            x_label: "transport".into(),
            y_label: "µs (log scale)".into(),
            log_y: true,
            categories: names.clone(),
            series: vec![
                pct("p50", "rtt_p50_ns"),
                pct("p99", "rtt_p99_ns"),
                pct("p99.9", "rtt_p999_ns"),
            ],
            ..Default::default()
        },
        Panel {
            title: "1 KiB streaming".into(),
            x_label: "transport".into(),
            y_label: "GB/s".into(),
            categories: names,
            series: vec![Series {
                label: "throughput".into(),
                points: rows
                    .iter()
                    .enumerate()
                    .map(|(i, r)| (i as f64, f(r, "gbytes_per_s")))
                    .collect(),
            }],
            ..Default::default()
        },
    ];
    report::plot_any(opts, "channel", &panels, stamp)
}
