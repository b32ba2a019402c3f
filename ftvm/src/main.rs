//! `ftvm`: the ftvm command-line tool.
//!
//! ```text
//! ftvm run --guest cpu                       # run an embedded guest (cpu, kv, stream, nondet)
//! ftvm run --guest ./my.elf --mem 128M       # run a static ELF
//! ftvm run --guest kv --disk kv.img --net tap:ftvm0 --cmdline "ip=10.0.2.15/24 port=6379"
//! ftvm backup  --guest cpu --peer 127.0.0.1:7000 --transport tcp   # a fault-tolerant pair
//! ftvm primary --guest cpu --peer 127.0.0.1:7000 --transport tcp
//! ftvm demo                                  # kill the primary of a kv pair under load
//! ```

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use ftvm_ft::observe::{Observer, SideRole};
use ftvm_vmm_core::devices::ConsoleOutput;
use ftvm_vmm_core::vm::{RunOutcome, Vm, VmConfig};
use indicatif::{ProgressBar, ProgressStyle};

use ftvm::config::{self, BackupConfig, PrimaryConfig};
use ftvm::lifecycle::Lifecycle;
use ftvm::{demo, joiner, load_guest, pair, parse_size, stat};

/// ftvm: a fault-tolerant KVM virtual machine system.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None, after_long_help = ftvm::exit::HELP)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log filter (tracing-subscriber env-filter syntax), also read from RUST_LOG.
    #[arg(long, global = true, default_value = "info")]
    log: String,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one VM standalone until the guest powers off (SIGTERM/SIGINT: stop it, print the
    /// summary, exit status 207).
    #[command(after_long_help = ftvm::exit::HELP)]
    Run(RunArgs),
    /// Run the primary of a fault-tolerant pair (records its inputs, ships the log).
    /// SIGTERM/SIGINT: a planned stop (the held outputs are released once acknowledged, the
    /// backup is told and does not fail over); exit status 207.
    #[command(after_long_help = ftvm::exit::HELP)]
    Primary(PrimaryConfig),
    /// Run the backup of a fault-tolerant pair (replays the primary's log; with `--arbiter`,
    /// goes live when the primary fails). SIGTERM/SIGINT: a planned stop (the primary is told
    /// and does not fail over); exit status 207.
    #[command(after_long_help = ftvm::exit::HELP)]
    Backup(BackupConfig),
    /// The failover demo: a kv pair under client load on this machine, the primary killed
    /// mid-load, the backup going live, every acknowledged write checked (needs root and KVM).
    /// `--shared-disk`: both sides on one disk image, read back again from `kv` booted alone on it.
    Demo(demo::DemoArgs),
    /// A live view of one or both sides of a pair from their `--metrics` endpoints (refreshed
    /// every second; `--once --json` for scripts).
    Stat(stat::StatArgs),
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Guest to run: an embedded guest name (cpu, kv, stream, nondet) or the path of a static x86-64
    /// ELF executable linked at 0x10000.
    #[arg(long)]
    guest: String,
    /// Guest RAM size, with optional K/M/G suffix: a multiple of 4 KiB, room for the image at
    /// 64 KiB plus a 1 MiB stack, at most 3.25G (RAM ends below the MMIO window).
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    mem: u64,
    /// Raw disk image for virtio-blk (size a multiple of 512 bytes).
    #[arg(long)]
    disk: Option<PathBuf>,
    /// Network backend for virtio-net: `tap:IFNAME`, an existing TAP interface (e.g. `ip tuntap
    /// add dev IFNAME mode tap`, with the host side's address on it); needs CAP_NET_ADMIN.
    #[arg(long)]
    net: Option<String>,
    /// Command line passed to the guest in the boot info (≤ 4000 bytes), e.g.
    /// "ip=10.0.2.15/24 gw=10.0.2.1 port=6379".
    #[arg(long, default_value = "")]
    cmdline: String,
    /// Write console output to this file instead of standard output.
    #[arg(long)]
    console: Option<PathBuf>,
    /// No progress spinner (also off when stderr is not a terminal).
    #[arg(long)]
    quiet: bool,
    /// Serve the live counters over HTTP at this `HOST:PORT` (`/metrics`, `/status.json`).
    #[arg(long, value_name = "HOST:PORT")]
    metrics: Option<String>,
    /// Run the guest twice with the same inputs — first live, every input recorded, then a
    /// replay of that recording — and compare at power-off what a fault-tolerant pair
    /// compares: exit code, exits, registers, memory, every output's digest, the console and
    /// the disk. Says whether the guest is deterministic given its logged inputs, i.e. whether
    /// it can be replicated (exit status 208 when it is not; otherwise the guest's code). With
    /// `--net` the first run serves as usual and the second replays its packets without the
    /// TAP; with `--disk` the second runs on a copy of the image taken before the first. The
    /// console output (of the first run) is printed once both runs ended.
    #[arg(long)]
    check_determinism: bool,
}

/// Prints a clap error: help and version as clap renders them (status 0), a usage error as
/// one line (status [`ftvm::exit::USAGE`]); a flag's value that its type refuses (a bad
/// transport, arbiter, cgroup directory …) is a bad configuration, as the same value in the
/// `--config` file is: one line, status [`ftvm::exit::ERROR`].
fn usage_error(e: &clap::Error) -> ! {
    if !e.use_stderr() {
        let _ = e.print();
        std::process::exit(0);
    }
    let text = e.render().to_string();
    let parts: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("Usage:") && !l.starts_with("For more"))
        .collect();
    let line = parts.join(" ");
    let line = line.strip_prefix("error: ").unwrap_or(&line);
    if matches!(
        e.kind(),
        clap::error::ErrorKind::ValueValidation | clap::error::ErrorKind::InvalidValue
    ) {
        eprintln!("ftvm: error: {line}");
        std::process::exit(ftvm::exit::ERROR);
    }
    eprintln!("ftvm: usage error: {line} (see --help)");
    std::process::exit(ftvm::exit::USAGE);
}

fn main() {
    let matches = Cli::command()
        .try_get_matches()
        .unwrap_or_else(|e| usage_error(&e));
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| usage_error(&e));
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cli.log));
    use tracing_subscriber::prelude::*;
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_filter(filter),
        )
        .init();
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Primary(args) => {
            let sub = matches.subcommand_matches("primary");
            pair_side(args, sub, "primary", pair::primary)
        }
        Command::Backup(args) => {
            let sub = matches.subcommand_matches("backup");
            pair_side(args, sub, "backup", backup)
        }
        Command::Demo(args) => demo::demo(args),
        Command::Stat(args) => stat::stat(&args),
    };
    if let Err(e) = result {
        std::process::exit(ftvm::cli::report_error(&e));
    }
}

/// `ftvm backup`: paired with its primary at the start ([`pair::backup`]), or joining a primary
/// that runs alone (`--join`: [`joiner::backup`]).
fn backup(bc: BackupConfig, lifecycle: &mut Lifecycle) -> anyhow::Result<()> {
    if bc.join.is_some() {
        joiner::backup(bc, lifecycle)
    } else {
        pair::backup(bc, lifecycle)
    }
}

/// `ftvm primary` / `ftvm backup`: the configuration (flags over `--config`), the signal
/// handling, then the side.
fn pair_side<T: config::RoleConfig>(
    args: T,
    matches: Option<&clap::ArgMatches>,
    who: &'static str,
    side: fn(T, &mut Lifecycle) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let empty = clap::ArgMatches::default();
    let cfg = config::load(args, matches.unwrap_or(&empty))?;
    if cfg.common().print_config {
        print!("{}", config::to_toml(&cfg)?);
        return Ok(());
    }
    let mut lifecycle = Lifecycle::install(who)?;
    side(cfg, &mut lifecycle)
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let elf = load_guest(&args.guest)?;
    let tap = match args.net.as_deref() {
        None => None,
        Some(spec) => match spec.strip_prefix("tap:") {
            Some(name) if !name.is_empty() => Some(name.to_string()),
            _ => bail!("--net {spec:?}: expected tap:IFNAME"),
        },
    };
    let console = match &args.console {
        Some(p) => ConsoleOutput::File(Arc::new(Mutex::new(
            std::fs::File::create(p).with_context(|| format!("cannot create {}", p.display()))?,
        ))),
        None => ConsoleOutput::Stdout,
    };
    let config = VmConfig {
        mem_size: args.mem,
        cmdline: args.cmdline.clone(),
        disk: args.disk.clone(),
        tap,
        net_without_backend: false,
        console,
    };
    if args.check_determinism {
        return check_determinism(&args.guest, &config, &elf);
    }
    let mut vm =
        Vm::new(&config, &elf).with_context(|| format!("cannot start guest {}", args.guest))?;
    let control = vm.control();
    let observer = Observer::new(SideRole::Run);
    observer.watch_exits(vm.stats());
    let _metrics = ftvm::metrics::start_if(args.metrics.as_deref(), &observer)?;
    let mut lifecycle = Lifecycle::install("run")?;
    lifecycle.attach(control.clone(), &format!("run: running {}", args.guest));
    lifecycle.watch(&observer);

    let show = !args.quiet && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let spinner = show.then(|| {
        let pb = ProgressBar::new_spinner();
        pb.set_style(
            ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        pb
    });
    let progress = spinner.clone().map(|pb| {
        let control = control.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut last = (Instant::now(), 0u64);
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(200));
                let n = control.exits();
                let dt = last.0.elapsed().as_secs_f64().max(1e-9);
                pb.set_message(format!(
                    "{n} exits, {:.0} exits/s",
                    (n - last.1) as f64 / dt
                ));
                pb.tick();
                last = (Instant::now(), n);
            }
        })
    });

    let start = Instant::now();
    let result = vm.run();
    let wall = start.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Release);
    if let Some(t) = progress {
        let _ = t.join();
    }
    if let Some(pb) = spinner {
        pb.finish_and_clear();
    }
    let outcome = result.context("VM stopped with an error")?;
    let total = vm.stats().total();
    eprintln!("--- ftvm run summary ---");
    eprintln!("guest      {}", args.guest);
    eprintln!("run time   {:.3} s", wall.as_secs_f64());
    eprintln!(
        "exits      {total} ({:.0}/s)",
        total as f64 / wall.as_secs_f64().max(1e-9)
    );
    for (kind, n) in vm.exits_by_kind() {
        if n > 0 {
            eprintln!("  {kind:<14} {n}");
        }
    }
    match outcome {
        RunOutcome::PoweredOff(code) => {
            eprintln!("exit code  {code}");
            std::process::exit(ftvm::exit::guest_status(code));
        }
        RunOutcome::Paused if lifecycle.stop_requested() => {
            eprintln!("stopped    by SIGTERM/SIGINT before the guest powered off");
            std::process::exit(ftvm::exit::STOPPED);
        }
        other => bail!("VM stopped before powering off: {other:?}"),
    }
}

/// `ftvm run --check-determinism`.
fn check_determinism(guest: &str, config: &VmConfig, elf: &[u8]) -> anyhow::Result<()> {
    use ftvm_vmm_core::determinism::check;
    eprintln!("checking determinism of {guest}: a live run (inputs recorded), then its replay");
    let start = Instant::now();
    let r = check(config, elf).with_context(|| format!("cannot check guest {guest}"))?;
    config
        .console
        .write(&r.console)
        .context("cannot write the console output")?;
    eprintln!("--- ftvm run --check-determinism ---");
    eprintln!("guest      {guest}");
    eprintln!(
        "run time   {:.3} s (both runs)",
        start.elapsed().as_secs_f64()
    );
    eprintln!(
        "inputs     {} reads, {} writes into guest memory recorded and replayed",
        r.inputs.0, r.inputs.1
    );
    match &r.second {
        Err(why) => eprintln!("second run {why}"),
        Ok(_) => {
            for c in &r.comparisons {
                if c.equal {
                    eprintln!("{:<10} equal ({})", c.what, c.first);
                } else {
                    eprintln!("{:<10} DIFFER: {} | {}", c.what, c.first, c.second);
                }
            }
        }
    }
    eprintln!(
        "verified   {} outputs of the replay equal to the first run's, {} differ",
        r.outputs.verified, r.outputs.mismatches
    );
    for (exit, what) in &r.outputs.first {
        eprintln!("  at exit {exit}: {what}");
    }
    if r.is_deterministic() {
        eprintln!("result     DETERMINISTIC: two runs with the same inputs ended alike");
        std::process::exit(ftvm::exit::guest_status(r.first.code));
    }
    eprintln!(
        "result     NONDETERMINISTIC: two runs with the same inputs ended differently; this guest uses an input the VMM cannot log (RDRAND, RDTSC, ...: guests/README.md) and cannot be replicated"
    );
    std::process::exit(ftvm::exit::NONDETERMINISTIC);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
