//! `logpath`: the per-entry cost of the replication log path, in one process, without a VM:
//! the primary's recorder appending entries into its log buffer (claim, encode in place,
//! commit, wake the sender poller: `ft::primary::ChannelRecorder`) and the backup's replay
//! source taking them from its log buffer (decode, match the exit, report executed:
//! `ft::backup::ChannelReplay`), the two ends the vCPU threads call at every exit. The log
//! travels between them over the real channel (sender and receiver pollers, TCP loopback).
//!
//! Each run appends `--exits` exits in chunks of [`CHUNK`] exits; after each chunk it waits
//! until the backup's buffer holds it (so the replay below never waits for the link) and
//! replays the chunk (one exit behind: the replay source must see an entry of a later exit
//! before it finishes one). Workloads: `read` (one `Read` entry per exit: an MMIO read of a
//! device register) and `read+write` (a 256-byte `Write` and a `Read` per exit: a packet
//! received by virtio-net). Rows: ns per entry of each chunk (hdrhistogram p50 / p99 over the
//! chunks, medians over the runs) and the mean over the run, for each side. (A thread's own
//! CPU time would be more robust on a shared host, but `/proc/thread-self/schedstat` only
//! moves at scheduler ticks, far coarser than a chunk, and the clock needs `unsafe` here: the
//! p50 of chunks is the figure to compare; a preempted chunk lands in the p99.)

use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use ftvm_channel::{Config, LogReceiver, LogSender};
use ftvm_ft::backup::{ChannelReplay, LogReader};
use ftvm_ft::primary::{ChannelRecorder, LogWriter};
use ftvm_ringbuf::IdleKind;
use ftvm_testkit::link::TcpLink;
use ftvm_vmm_core::record::{Recorder, ReplaySource};
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::report;
use crate::Opts;

/// Exits appended (then replayed) at a time.
const CHUNK: u64 = 1024;
/// The MMIO address of the logged reads (a device register; only named in errors).
const ADDR: u64 = 0xd000_0008;
/// Bytes of each logged guest write (`read+write`).
const WRITE_LEN: usize = 256;

/// Options of `ftvm-bench logpath`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Exits per run and workload [default: 200000, 20000 with --quick].
    #[arg(long)]
    pub exits: Option<u64>,
    /// Runs; each row reports the medians over them.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
}

/// One row of results/logpath.json.
#[derive(Debug, Serialize)]
struct Row {
    /// `read` or `read+write`.
    workload: &'static str,
    /// `append` (primary: the recorder) or `replay` (backup: the replay source).
    side: &'static str,
    /// Log entries per exit.
    entries_per_exit: u64,
    /// Wall time per entry, median chunk.
    ns_per_entry_p50: f64,
    /// Wall time per entry, 99th percentile chunk.
    ns_per_entry_p99: f64,
    /// Wall time per entry over the whole run (chunks together).
    mean_ns_per_entry: f64,
    /// Entries per run.
    entries: u64,
    runs: usize,
}

/// The primary's end: its recorder, and the log position it wrote and the backup holds.
struct Primary {
    recorder: Box<dyn Recorder>,
    positions: Box<dyn Fn() -> (u64, u64)>,
}

/// The recorder a primary run installs in its VM, over `sender`.
fn primary(sender: LogSender) -> anyhow::Result<Primary> {
    let writer = LogWriter::new(sender, IdleKind::Yield);
    let w = writer.clone();
    Ok(Primary {
        recorder: Box::new(ChannelRecorder::new(writer.take_appender()?)),
        positions: Box::new(move || {
            (
                w.position().load(std::sync::atomic::Ordering::Acquire),
                w.sender().acked_seq(),
            )
        }),
    })
}

/// The replay source a backup run installs in its VM, over `rx`.
fn backup(rx: LogReceiver) -> Box<dyn ReplaySource> {
    let reader = LogReader::new(rx, IdleKind::Yield, None);
    Box::new(ChannelReplay::new(reader))
}

/// A connected primary and backup over TCP loopback.
fn pair() -> anyhow::Result<(Primary, Box<dyn ReplaySource>)> {
    let (backup_end, primary_end) = TcpLink::new().ring(4 << 20).connect()?;
    let rx = std::thread::spawn(move || backup_end.start(Config::default()));
    let tx = primary_end.start(Config::default())?;
    let rx = rx
        .join()
        .map_err(|_| anyhow!("receiver thread panicked"))??;
    Ok((primary(tx)?, backup(rx)))
}

/// Per-entry figures of one side over one run.
struct Side {
    hist: Histogram<u64>,
    total: Duration,
}

impl Side {
    fn new() -> anyhow::Result<Self> {
        Ok(Side {
            hist: Histogram::new_with_bounds(1, 60_000_000_000, 3).context("histogram")?,
            total: Duration::ZERO,
        })
    }

    /// Times `f` (which handles `entries` entries) on this thread.
    fn time<T>(&mut self, entries: u64, f: impl FnOnce() -> T) -> T {
        let t0 = Instant::now();
        let r = f();
        let took = t0.elapsed();
        let ns = took.as_nanos() as u64 / entries.max(1);
        self.total += took;
        let _ = self.hist.record(ns.max(1));
        r
    }
}

/// One run of `workload` over `exits` exits: (append, replay).
fn one(writes: bool, exits: u64) -> anyhow::Result<(Side, Side)> {
    let (mut p, mut replay) = pair()?;
    let (mut append, mut take) = (Side::new()?, Side::new()?);
    let data = [0x5au8; WRITE_LEN];
    let per_exit = if writes { 2 } else { 1 };
    let mut replayed = 1u64;
    let mut exit = 1u64;
    // One more exit than measured: the replay of the last one needs an entry after it.
    while exit <= exits + 1 {
        let end = (exit + CHUNK).min(exits + 2);
        let rec = &mut p.recorder;
        append.time((end - exit) * per_exit, || {
            for e in exit..end {
                if writes {
                    rec.guest_write(e, 0x10_0000, &data);
                }
                rec.external_read(e, ADDR, e);
            }
        });
        exit = end;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (written, acked) = (p.positions)();
            if acked >= written {
                break;
            }
            if Instant::now() > deadline {
                anyhow::bail!("the backup did not acknowledge {written} (holds {acked})");
            }
            std::thread::yield_now();
        }
        let upto = exit - 1;
        let r = take.time((upto - replayed) * per_exit, || -> anyhow::Result<()> {
            for e in replayed..upto {
                let v = replay.external_read(e, ADDR)?;
                anyhow::ensure!(v == e, "exit {e}: read {v}");
                replay.guest_writes(e, &mut |gpa, d| {
                    std::hint::black_box((gpa, d));
                })?;
            }
            Ok(())
        });
        r?;
        replayed = upto;
    }
    Ok((append, take))
}

/// Entry point.
///
/// # Errors
/// The pair cannot be connected; the replay fails.
pub fn run(opts: &Opts, args: &Args) -> anyhow::Result<()> {
    let exits = args
        .exits
        .unwrap_or(if opts.quick { 20_000 } else { 200_000 })
        .max(CHUNK);
    let runs = args.runs.max(1);
    let mut rows = Vec::new();
    for (workload, writes) in [("read", false), ("read+write", true)] {
        let per_exit = if writes { 2 } else { 1 };
        let entries = exits * per_exit;
        // [side] = (p50s, p99s, means) over the runs.
        let mut s: [[Vec<f64>; 3]; 2] = Default::default();
        for run in 0..runs {
            eprintln!("logpath: {workload}: run {}/{runs} ...", run + 1);
            let (a, r) = one(writes, exits)?;
            for (i, side) in [a, r].iter().enumerate() {
                s[i][0].push(side.hist.value_at_quantile(0.5) as f64);
                s[i][1].push(side.hist.value_at_quantile(0.99) as f64);
                s[i][2].push(side.total.as_nanos() as f64 / entries as f64);
            }
        }
        for (i, side) in ["append", "replay"].into_iter().enumerate() {
            let [p50, p99, mean] = s[i].clone().map(|mut v| report::median(&mut v));
            rows.push(Row {
                workload,
                side,
                entries_per_exit: per_exit,
                ns_per_entry_p50: p50,
                ns_per_entry_p99: p99,
                mean_ns_per_entry: mean,
                entries,
                runs,
            });
        }
    }
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.workload.to_string(),
                r.side.to_string(),
                format!("{:.0}", r.ns_per_entry_p50),
                format!("{:.0}", r.ns_per_entry_p99),
                format!("{:.0}", r.mean_ns_per_entry),
            ]
        })
        .collect();
    report::print_table(
        &format!("log path per entry, {exits} exits in chunks of {CHUNK} (medians of {runs} runs)"),
        &[
            "workload",
            "side",
            "ns/entry p50",
            "ns/entry p99",
            "mean ns/entry",
        ],
        &table,
    );
    let path = report::write_json(opts, "logpath", &rows)?;
    eprintln!("wrote {}", path.display());
    Ok(())
}
