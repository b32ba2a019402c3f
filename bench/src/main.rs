//! `ftvm-bench`: one driver, one subcommand per experiment.
//!
//! ```text
//! cargo run --release -p ftvm-bench -- <name> [--quick] [--out DIR] [benchmark options]
//! ```
//!
//! Every benchmark writes `results/<name>.json` (header: git revision, UTC date, machine; then
//! its rows, our figures beside the peers' in the same run) and a plot `results/<name>.svg`
//! through [`report`].
//!
//! Adding a benchmark: put it in `src/<name>.rs` with
//! `pub fn run(opts: &Opts) -> anyhow::Result<()>`, add `mod <name>;` below and one line in
//! [`BENCHMARKS`].

mod channel;
mod failover;
mod ft;
mod report;
mod ringbuf;
mod soak;
mod throttle;
mod vmm;

use std::path::PathBuf;

use anyhow::{bail, Context};

/// Options common to every benchmark, plus the arguments it parses itself.
#[derive(Debug, Clone)]
pub struct Opts {
    /// Short run (for CI and a first look): each benchmark finishes in under ~30 s.
    pub quick: bool,
    /// Directory for `<name>.json` and the plot (default: `<workspace>/results`).
    pub out: PathBuf,
    /// Arguments not understood by the driver, for the benchmark to parse.
    pub rest: Vec<String>,
}

/// A benchmark: its subcommand name, a one-line description, its entry point.
type Bench = (&'static str, &'static str, fn(&Opts) -> anyhow::Result<()>);

/// The subcommands. One line per benchmark.
const BENCHMARKS: &[Bench] = &[
    (
        "ringbuf",
        "log buffer vs rtrb vs crossbeam ArrayQueue: throughput and RTT",
        ringbuf::run,
    ),
    (
        "vmm",
        "VM exit cost by kind; kv guest under redis-benchmark through a TAP",
        vmm::run,
    ),
    (
        "channel",
        "every transport side by side: 64 B RTT to ack, 1 KiB streaming",
        channel::run,
    ),
    (
        "ft",
        "kv under redis-benchmark, FT off vs on per transport (Table 1 ratio, log Mbit/s, output delay)",
        ft::run,
    ),
    (
        "failover",
        "kill the primary under client load, repeatedly: failover time p50/max, acked writes lost",
        failover::run,
    ),
    (
        "throttle",
        "backup slowed then released: lag and primary CPU share over time under the throttle",
        throttle::run,
    ),
    (
        "replot",
        "redraw results/<name>.svg from results/<name>.json, no run (channel, ft, vmm; default: all)",
        replot,
    ),
    (
        "soak",
        "the demo's load for minutes after filling kv to -OOM: RSS of both sides over time",
        soak::run,
    ),
];

/// A benchmark's plot drawn from its results' rows, stamped with the file's revision and date.
type Replot = fn(&Opts, &serde_json::Value, Option<&str>) -> anyhow::Result<PathBuf>;

/// The benchmarks whose plot can be redrawn from their JSON.
const REPLOTS: &[(&str, Replot)] = &[
    ("channel", channel::plot),
    ("ft", ft::plot),
    ("vmm", vmm::plot),
];

/// `ftvm-bench replot [NAME...]`: each named plot drawn again from `<out>/<name>.json`.
fn replot(opts: &Opts) -> anyhow::Result<()> {
    let names: Vec<&str> = if opts.rest.is_empty() {
        REPLOTS.iter().map(|(n, _)| *n).collect()
    } else {
        opts.rest.iter().map(String::as_str).collect()
    };
    for name in names {
        let Some((_, plot)) = REPLOTS.iter().find(|(n, _)| *n == name) else {
            bail!(
                "replot {name:?}: only {:?}",
                REPLOTS.iter().map(|(n, _)| *n).collect::<Vec<_>>()
            );
        };
        let path = opts.out.join(format!("{name}.json"));
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let file: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("bad JSON in {}", path.display()))?;
        let h = &file["header"];
        let stamp = format!(
            "ftvm {} · {}",
            h["git_rev"].as_str().unwrap_or("unknown"),
            h["date_utc"].as_str().unwrap_or("unknown date")
        );
        let svg = plot(opts, &file["rows"], Some(&stamp))?;
        eprintln!("wrote {} (from {})", svg.display(), path.display());
    }
    Ok(())
}

fn usage() -> String {
    let mut s =
        String::from("usage: ftvm-bench <name> [--quick] [--out DIR] [options]\n\nbenchmarks:\n");
    for (name, what, _) in BENCHMARKS {
        s.push_str(&format!("  {name:<12} {what}\n"));
    }
    s
}

fn parse(args: Vec<String>) -> anyhow::Result<(String, Opts)> {
    let mut name = None;
    let mut opts = Opts {
        quick: false,
        out: report::default_results_dir(),
        rest: Vec::new(),
    };
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => opts.quick = true,
            "--out" => opts.out = PathBuf::from(it.next().context("--out needs a directory")?),
            "-h" | "--help" => {
                print!("{}", usage());
                std::process::exit(0);
            }
            _ if name.is_none() && !a.starts_with('-') => name = Some(a),
            _ => opts.rest.push(a),
        }
    }
    let Some(name) = name else {
        bail!("no benchmark named\n{}", usage())
    };
    Ok((name, opts))
}

fn main() -> anyhow::Result<()> {
    let (name, opts) = parse(std::env::args().skip(1).collect())?;
    let Some((_, _, run)) = BENCHMARKS.iter().find(|(n, _, _)| *n == name) else {
        bail!("unknown benchmark {name:?}\n{}", usage());
    };
    run(&opts).with_context(|| format!("benchmark {name}"))
}
