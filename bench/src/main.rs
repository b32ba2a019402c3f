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
//! `ftvm-bench <name> --help` lists a benchmark's options (`ftvm-bench --help`: the list).
//!
//! Adding a benchmark: put it in `src/<name>.rs` with its options as
//! `#[derive(clap::Args)] pub struct Args` (doc comments are the help; defaults that depend on
//! `--quick` say so in the text) and `pub fn run(opts: &Opts, args: &Args) -> anyhow::Result<()>`,
//! add `mod <name>;` below, one variant to [`Bench`] (its doc comment is the one-line
//! description) and one arm in `main`. A benchmark that still parses its own arguments from
//! [`Opts::rest`] registers as `Name(RawArgs)` with
//! `Bench::Name(a) => ("name", name::run(&Opts { rest: a.rest.clone(), ..opts.clone() }))`.

mod channel;
mod failover;
mod ft;
mod logpath;
mod report;
mod reprotect;
mod ringbuf;
mod soak;
mod throttle;
mod vmm;

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};

/// Options common to every benchmark (given before or after its name).
#[derive(Debug, Clone)]
pub struct Opts {
    /// Short run (for CI and a first look): each benchmark finishes in under ~30 s.
    pub quick: bool,
    /// Directory for `<name>.json` and the plot (default: `<workspace>/results`).
    pub out: PathBuf,
    /// The arguments of a benchmark that parses its own ([`RawArgs`]); empty otherwise.
    pub rest: Vec<String>,
}

/// ftvm benchmarks: each writes results/NAME.json and a plot beside it, our figures beside
/// the peers' measured in the same run.
#[derive(Debug, Parser)]
#[command(name = "ftvm-bench", version)]
struct Cli {
    /// Short run (for CI and a first look): each benchmark finishes in under ~30 s.
    #[arg(long, global = true)]
    quick: bool,
    /// Directory for NAME.json and the plot [default: WORKSPACE/results].
    #[arg(long, global = true, value_name = "DIR")]
    out: Option<PathBuf>,
    #[command(subcommand)]
    bench: Bench,
}

/// The benchmarks: one variant each, its options a `clap::Args` struct in its module.
#[derive(Debug, Subcommand)]
enum Bench {
    /// Log buffer vs rtrb vs crossbeam ArrayQueue: throughput and RTT.
    Ringbuf(ringbuf::Args),
    /// VM exit cost by kind; kv guest under redis-benchmark through a TAP.
    Vmm(NoArgs),
    /// Every transport side by side: 64 B RTT to ack, 1 KiB streaming.
    Channel(channel::Args),
    /// kv under redis-benchmark, FT off vs on per transport (Table 1 ratio, log Mbit/s, output
    /// delay).
    Ft(ft::Args),
    /// Per-entry cost of the log path: the primary's recorder appending, the backup's replay
    /// source taking (ns and CPU per entry).
    Logpath(logpath::Args),
    /// Kill the primary under client load, repeatedly: failover time p50/max, acked writes
    /// lost.
    Failover(failover::Args),
    /// A new backup joins the lone kv primary under load, repeatedly: pause at the cut
    /// p50/p99/max, transfer time and bytes, client latency during the joins.
    Reprotect(reprotect::Args),
    /// Backup slowed then released: lag and primary CPU share over time under the throttle.
    Throttle(throttle::Args),
    /// Redraw results/NAME.svg from results/NAME.json, no run (channel, ft, vmm).
    Replot(ReplotArgs),
    /// The demo's load for minutes after filling kv to -OOM: RSS of both sides over time.
    Soak(soak::Args),
}

/// A benchmark without options.
#[derive(Debug, Clone, clap::Args)]
pub struct NoArgs {}

/// The options of a benchmark that parses its own arguments from [`Opts::rest`] (register it
/// as `Name(RawArgs)`; prefer a `clap::Args` struct, which gives it a `--help`).
#[derive(Debug, Clone, clap::Args)]
pub struct RawArgs {
    /// The benchmark's own options.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub rest: Vec<String>,
}

/// Options of `ftvm-bench replot`.
#[derive(Debug, Clone, clap::Args)]
pub struct ReplotArgs {
    /// The plots to redraw [default: all of channel, ft, vmm].
    pub names: Vec<String>,
}

/// A benchmark's plot drawn from its results' rows, stamped with the file's revision and date.
type Replot = fn(&Opts, &serde_json::Value, Option<&str>) -> anyhow::Result<PathBuf>;

/// The benchmarks whose plot can be redrawn from their JSON.
const REPLOTS: &[(&str, Replot)] = &[
    ("channel", channel::plot),
    ("ft", ft::plot),
    ("vmm", vmm::plot),
];

/// `ftvm-bench replot [NAME...]`: each named plot drawn again from `<out>/<name>.json`.
fn replot(opts: &Opts, args: &ReplotArgs) -> anyhow::Result<()> {
    let names: Vec<&str> = if args.names.is_empty() {
        REPLOTS.iter().map(|(n, _)| *n).collect()
    } else {
        args.names.iter().map(String::as_str).collect()
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

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let opts = Opts {
        quick: cli.quick,
        out: cli.out.unwrap_or_else(report::default_results_dir),
        rest: Vec::new(),
    };
    let (name, result) = match &cli.bench {
        Bench::Ringbuf(a) => ("ringbuf", ringbuf::run(&opts, a)),
        Bench::Vmm(_) => ("vmm", vmm::run(&opts)),
        Bench::Channel(a) => ("channel", channel::run(&opts, a)),
        Bench::Ft(a) => ("ft", ft::run(&opts, a)),
        Bench::Logpath(a) => ("logpath", logpath::run(&opts, a)),
        Bench::Failover(a) => ("failover", failover::run(&opts, a)),
        Bench::Throttle(a) => ("throttle", throttle::run(&opts, a)),
        Bench::Reprotect(a) => ("reprotect", reprotect::run(&opts, a)),
        Bench::Replot(a) => ("replot", replot(&opts, a)),
        Bench::Soak(a) => ("soak", soak::run(&opts, a)),
    };
    result.with_context(|| format!("benchmark {name}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_is_consistent_and_every_benchmark_has_its_help() {
        use clap::CommandFactory;
        let mut cmd = Cli::command();
        cmd.build();
        cmd.clone().debug_assert();
        for (bench, flag) in [
            ("ringbuf", "--rtt-samples"),
            ("channel", "--only"),
            ("ft", "--requests"),
            ("logpath", "--exits"),
            ("failover", "--fail-timeout"),
            ("throttle", "--tau-ms"),
            ("reprotect", "--runs"),
        ] {
            let help = cmd
                .find_subcommand_mut(bench)
                .expect(bench)
                .render_long_help()
                .to_string();
            assert!(help.contains(flag), "{bench}: {flag} missing\n{help}");
            assert!(help.contains("--quick"), "{bench}: --quick missing");
        }
        let parsed =
            Cli::try_parse_from(["ftvm-bench", "ringbuf", "--quick", "--publish-every", "7"])
                .expect("alias");
        match parsed.bench {
            Bench::Ringbuf(a) => assert_eq!(a.batch, 7),
            other => panic!("{other:?}"),
        }
        assert!(Cli::try_parse_from(["ftvm-bench", "channel", "--only", "both"]).is_err());
    }
}
