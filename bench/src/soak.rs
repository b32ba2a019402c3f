//! `soak`: the demo's load on a `kv` pair (FT on, shm transport, file arbiter, 64 MiB guests)
//! for minutes, sampling both processes' RSS and the guest's memory every second
//! ([`ftvm::soak`]): the guest's store is first filled until it answers `-OOM` (touching its
//! memory on both sides), flushed, then loaded by the demo's clients. Reports each process's
//! RSS over the window after the warm-up (slope in KiB/min, first, last, max) beside the leak
//! it must rule out (1 MiB/min).
//!
//! ```text
//! cargo run --release -p ftvm-bench -- soak [--quick] [--seconds S] [--mem SIZE] [--clients N]
//!     [--transport T]
//! ```
//! `--quick`: 60 s of load; full: 300 s. Runs the `ftvm` binary next to this one (root,
//! /dev/kvm). `results/soak.json`: one row with the summary and every sample;
//! `results/soak.svg`: RSS of both processes and the guest's `used_memory` over time.

use std::time::Duration;

use anyhow::{bail, Context};
use ftvm::soak::{self, SoakConfig, SoakReport, Trend};

use crate::report::{self, Panel, Series};
use crate::Opts;

/// The smallest leak the run must be able to show, KiB per minute.
const LEAK_KIB_PER_MIN: f64 = 1024.0;

/// Options of `ftvm-bench soak`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Seconds of client load after kv is full [default: 300, 60 with --quick].
    #[arg(long)]
    pub seconds: Option<u64>,
    /// Guest RAM of the pair (K/M/G suffix) [default: the demo's].
    #[arg(long)]
    pub mem: Option<String>,
    /// Client connections [default: the demo's].
    #[arg(long)]
    pub clients: Option<usize>,
    /// Logging transport of the pair [default: the demo's].
    #[arg(long)]
    pub transport: Option<String>,
}

fn config(opts: &Opts, args: &Args) -> anyhow::Result<SoakConfig> {
    let mut cfg = SoakConfig::new(crate::ft::ftvm_binary()?, "bsoak");
    let quick = if opts.quick { 60 } else { 300 };
    cfg.load_for = Duration::from_secs(args.seconds.unwrap_or(quick));
    if let Some(mem) = &args.mem {
        cfg.scenario.mem = mem.clone();
    }
    if let Some(clients) = args.clients {
        cfg.clients = clients;
    }
    if let Some(transport) = &args.transport {
        cfg.scenario.transport = transport.clone();
    }
    Ok(cfg)
}

fn mib(kib: f64) -> String {
    format!("{:.1}", kib / 1024.0)
}

/// Runs the benchmark.
pub fn run(opts: &Opts, args: &Args) -> anyhow::Result<()> {
    let cfg = config(opts, args)?;
    let total = cfg.load_for.as_secs();
    let bar = report::progress(total, "soak");
    let r = soak::run(&cfg, &mut |x| {
        bar.set_position(x.t_s.clamp(0.0, total as f64) as u64);
        bar.set_message(format!(
            "{} primary {} MiB backup {} MiB guest {:.1} MiB, {} acked, {} OOM",
            x.phase,
            mib(x.primary.vm_rss_kib as f64),
            mib(x.backup.vm_rss_kib as f64),
            x.guest_used_memory.unwrap_or(0) as f64 / 1048576.0,
            x.acked,
            x.oom
        ));
    })
    .context("soak run")?;
    bar.finish_and_clear();
    let row = |side: &str, t: &Trend, max_kib: u64| {
        vec![
            side.to_string(),
            mib(t.first),
            mib(t.last),
            mib(max_kib as f64),
            format!("{:+.0}", t.slope_per_min),
            format!("{LEAK_KIB_PER_MIN:.0}"),
        ]
    };
    report::print_table(
        &format!(
            "soak: RSS over the last {:.0} s of {:.0} s of load ({}, {}, {} clients); fill: {} × {} KiB until -OOM",
            r.window_s,
            r.load_s,
            r.mem,
            r.transport,
            r.clients,
            r.fill.values,
            r.fill.value_bytes >> 10
        ),
        &["process", "first MiB", "last MiB", "max MiB", "KiB/min", "leak KiB/min"],
        &[
            row("primary", &r.primary_rss_kib, r.primary_rss_max_kib),
            row("backup", &r.backup_rss_kib, r.backup_rss_max_kib),
        ],
    );
    eprintln!(
        "load: {} acked writes ({:.0}/s), {} OOM replies, {} client errors; {} read back, {} lost; \
         exits after SHUTDOWN {:?} in {:?} s",
        r.acked_writes,
        r.acked_writes as f64 / r.load_s.max(1e-9),
        r.oom_replies,
        r.client_errors,
        r.acked_writes_checked,
        r.acked_writes_lost,
        r.exit_codes,
        r.exit_s
    );
    let path = report::write_json(opts, "soak", std::slice::from_ref(&r))?;
    let svg = report::plot_svg(opts, "soak", &panels(&r))?;
    eprintln!("wrote {} and {}", path.display(), svg.display());
    if r.acked_writes_lost > 0 {
        bail!("{} acknowledged writes lost", r.acked_writes_lost);
    }
    Ok(())
}

fn panels(r: &SoakReport) -> Vec<Panel> {
    let series = |label: &str, f: &dyn Fn(&soak::Sample) -> Option<f64>| Series {
        label: label.into(),
        points: r
            .samples
            .iter()
            .filter_map(|x| Some((x.t_s, f(x)?)))
            .collect(),
    };
    let mib = |kib: u64| Some(kib as f64 / 1024.0);
    vec![
        Panel {
            title: format!("VmRSS (fill before 0 s; window after {:.0} s)", r.warmup_s),
            x_label: "s of load".into(),
            y_label: "MiB".into(),
            log_x: false,
            log_y: false,
            categories: Vec::new(),
            series: vec![
                series("primary", &|x| mib(x.primary.vm_rss_kib)),
                series("backup", &|x| mib(x.backup.vm_rss_kib)),
                series("primary shm", &|x| mib(x.primary.rss_shmem_kib)),
            ],
        },
        Panel {
            title: format!(
                "guest used_memory (maxmemory {:.1} MiB)",
                r.fill.maxmemory as f64 / 1048576.0
            ),
            x_label: "s of load".into(),
            y_label: "MiB".into(),
            log_x: false,
            log_y: false,
            categories: Vec::new(),
            series: vec![series("used_memory", &|x| {
                x.guest_used_memory.map(|v| v as f64 / 1048576.0)
            })],
        },
    ]
}
