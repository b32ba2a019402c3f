//! `ftvm demo`: a primary and a backup of `kv` on this machine, client load, SIGKILL of the
//! primary mid-load, the backup going live, and a check that every acknowledged write survived.
//!
//! ```text
//! phase      replicated ───────── kill ── failover ── live ───────── check ── shutdown
//! clients    SET k v (+OK → acked)         (waiting)   SET k v ...     GET every acked key
//! primary    records, ships the log   ✗ SIGKILL
//! backup     replays                       detects, wins generation 2, attaches the TAP, runs
//! ```
//! With `--cycles N` the failover repeats N times: after each one (but the last) a new backup
//! joins the survivor by live state transfer (`ftvm backup --join`, `ftvm_ft::join`), the
//! pair runs replicated again, and its primary is killed; the summary gives each cycle's
//! failover time and re-protection pause and duration.
//! With `--shared-disk` both sides name one disk image (`ftvm primary/backup --shared-disk`,
//! `vmm-core/DEVICES.md`): `kv` appends every write to its log on that image before replying,
//! the primary's disk writes wait for the backup's acknowledgement, the replaying backup drops
//! them and owns the image once live. After the new primary powered off, `kv` is booted alone
//! on the image (`ftvm run`) and every acknowledged write is read back a second time, from the
//! store its log recovered.
//!
//! The clients write unique keys, so a long run fills `kv`'s store: it then answers `-OOM`
//! (Redis's `maxmemory` error), which the clients count apart (`oom_replies`: neither acked nor
//! lost) and take as an answer, so the failover is timed to the new primary's first reply of
//! any kind.
//!
//! Needs root (network namespace, TAP) and `/dev/kvm`; everything it creates is removed at the
//! end, on error and on Ctrl-C. Exit status: 0 when no acknowledged write was lost, 1 otherwise
//! (and on any failure).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::client::{Checker, Load, LoadConfig, Reply, RespConn};
use crate::scenario::{Node, Scenario, ScenarioConfig, Side, JOIN_PORT};
use ftvm_ft::observe::Snapshot;

/// Flags of `ftvm demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Transport of the log: shm, tcp, tcp-spin, uring (xdp: see `ftvm primary --help`).
    #[arg(long, default_value = "shm")]
    pub transport: String,
    /// Arbiter: `etcd` starts a local etcd inside the demo's namespace; `etcd://HOST:PORT` (or
    /// `etcd:http://HOST:PORT,...`) uses an etcd reachable from inside the namespace; `file:DIR`
    /// a shared directory. Default: a file arbiter in the demo's temporary directory.
    #[arg(long)]
    pub arbiter: Option<String>,
    /// Seconds of replicated load before the primary is killed.
    #[arg(long, default_value_t = 3.0)]
    pub kill_after: f64,
    /// Seconds of load on the new primary after it answered, before the final check.
    #[arg(long, default_value_t = 3.0)]
    pub run_after: f64,
    /// Client threads (one connection each).
    #[arg(long, default_value_t = 4)]
    pub clients: usize,
    /// Failure-detection timeout of both sides, in milliseconds (default: that of `ftvm
    /// primary/backup`).
    #[arg(long)]
    pub fail_timeout: Option<u64>,
    /// Write the summary as JSON to this file.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// No progress bar (also off when stderr is not a terminal).
    #[arg(long)]
    pub quiet: bool,
    /// Log filter of the two `ftvm` processes.
    #[arg(long, default_value = "warn")]
    pub child_log: String,
    /// Both sides name one disk image (`ftvm primary/backup --shared-disk`) instead of each its
    /// own copy; afterwards `kv` is booted alone on that image and every acknowledged write is
    /// read back from it too.
    #[arg(long)]
    pub shared_disk: bool,
    /// Failovers in a row: after each one (but the last) a new backup joins the survivor by
    /// live state transfer (`ftvm backup --join`), then the new primary is killed again. Needs
    /// --transport tcp, tcp-spin or uring (the join's connection carries the log).
    #[arg(long, default_value_t = 1)]
    pub cycles: u16,
}

/// One failover of `ftvm demo --cycles`, and the re-protection after it.
#[derive(Debug, Clone, Serialize)]
pub struct CycleSummary {
    /// SIGKILL of the primary → first client reply from the new primary, in ms.
    pub failover_ms: f64,
    /// The guest's pause at the cut of the join that followed (none after the last cycle).
    pub reprotect_pause_ms: Option<f64>,
    /// From starting the new backup to its replaying, in seconds.
    pub reprotect_s: Option<f64>,
}

/// The summary of a demo run (`--report`).
#[derive(Debug, Clone, Serialize)]
pub struct DemoSummary {
    /// Transport of the log.
    pub transport: String,
    /// Arbiter spec used.
    pub arbiter: String,
    /// `own-copy` (each side its own image) or `shared` (`--shared-disk`: one image).
    pub disk_mode: String,
    /// Acknowledged SETs per second before the kill.
    pub ops_per_s_before: f64,
    /// Acknowledged SETs per second on the new primary.
    pub ops_per_s_after: f64,
    /// SIGKILL of the primary → first client reply from the new primary, in ms.
    pub failover_ms: f64,
    /// SIGKILL → the backup's "LIVE" line seen, in ms (if it printed one).
    pub live_line_ms: Option<f64>,
    /// The backup's own go-live timings (from its report, when it wrote one).
    pub backup_golive: Option<serde_json::Value>,
    /// Acknowledged writes read back.
    pub acked_writes_checked: u64,
    /// Acknowledged writes missing or different (must be 0).
    pub acked_writes_lost: u64,
    /// Examples of lost writes.
    pub lost_examples: Vec<String>,
    /// What throttled the primary (`cgroup-v2`, `cgroup-v1`, `pacer`), from its metrics
    /// endpoint before the kill.
    pub throttle_actuator: Option<String>,
    /// The smallest CPU share the throttle gave the primary's vCPU before the kill.
    pub throttle_min_share: Option<f64>,
    /// Client errors (connection failures, timeouts, error replies other than `-OOM`) during
    /// the whole run.
    pub client_errors: u64,
    /// Writes answered `-OOM` (the guest's store was full; not acknowledged, not lost).
    pub oom_replies: u64,
    /// Acknowledged SETs in all.
    pub acked_writes: u64,
    /// What the pair left on the one image (`--shared-disk` only).
    pub shared_disk: Option<SharedDiskSummary>,
    /// Every failover and re-protection (`--cycles`; one entry by default).
    pub cycles: Vec<CycleSummary>,
}

/// The shared image after the run (`ftvm demo --shared-disk`).
#[derive(Debug, Clone, Serialize)]
pub struct SharedDiskSummary {
    /// Size of the image in bytes.
    pub image_bytes: u64,
    /// Digest of the image when the new primary powered off (its report's `disk_digest`).
    pub digest_at_power_off: Option<String>,
    /// The new primary's disk counters (its report's `shared_disk`): `dropped` = the old
    /// primary's write requests it did not repeat while replaying, `writes` = its own after
    /// going live, `redone` = requests it completed at go-live, `reads` = reads from the file.
    pub backup_disk: Option<serde_json::Value>,
    /// Keys `kv` booted alone on the image recovered from its log (its console line).
    pub keys_recovered: Option<u64>,
    /// Acknowledged writes read back from `kv` booted alone on the image.
    pub acked_writes_checked: u64,
    /// Of those, missing or different (must be 0).
    pub acked_writes_lost: u64,
    /// Examples of lost writes.
    pub lost_examples: Vec<String>,
}

impl DemoSummary {
    /// Acknowledged writes lost: in the check on the new primary, or (shared disk) in the
    /// check of `kv` booted alone on the image.
    pub fn lost(&self) -> u64 {
        self.acked_writes_lost + self.shared_disk.as_ref().map_or(0, |d| d.acked_writes_lost)
    }
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Blocks SIGINT, SIGTERM and SIGHUP in this thread (and so in every thread started after) and
/// starts a thread that waits for them and sets [`INTERRUPTED`]; the demo loop then unwinds and
/// the guards clean up.
fn handle_signals() -> anyhow::Result<()> {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, exclusively borrowed sigset_t; the signals are valid numbers.
    let rc = unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut())
    };
    if rc != 0 {
        bail!("cannot block SIGINT/SIGTERM (error {rc})");
    }
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let mut sig = 0;
            // SAFETY: `set` holds the blocked signals; `sig` is a valid out pointer.
            if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                INTERRUPTED.store(true, Ordering::Release);
            }
        })
        .context("cannot start the signal thread")?;
    Ok(())
}

fn check_interrupted() -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::Acquire) {
        bail!("interrupted: cleaning up");
    }
    Ok(())
}

/// Progress display: a spinner line with phase and ops/s when stderr is a terminal, plain lines
/// otherwise.
struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    fn new(quiet: bool) -> Self {
        let show = !quiet && std::io::IsTerminal::is_terminal(&std::io::stderr());
        let bar = show.then(|| {
            let pb = ProgressBar::new_spinner();
            pb.set_style(
                ProgressStyle::with_template("{spinner} {elapsed:>3} {prefix:>10} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            pb.enable_steady_tick(Duration::from_millis(100));
            pb
        });
        Progress { bar }
    }

    fn phase(&self, phase: &str) {
        if let Some(b) = &self.bar {
            b.set_prefix(phase.to_string());
        }
    }

    fn status(&self, msg: String) {
        if let Some(b) = &self.bar {
            b.set_message(msg);
        }
    }

    fn line(&self, msg: impl AsRef<str>) {
        match &self.bar {
            Some(b) => b.println(msg.as_ref()),
            None => eprintln!("{}", msg.as_ref()),
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// Shows the children's new stderr lines.
struct Echo {
    seen: [usize; 2],
}

impl Echo {
    fn show(&mut self, p: &Progress, nodes: [Option<&Node>; 2]) {
        for (i, n) in nodes.into_iter().enumerate() {
            if let Some(n) = n {
                let new = n.lines_from(self.seen[i]);
                self.seen[i] += new.len();
                for l in new {
                    p.line(format!("  [{}] {l}", n.name()));
                }
            }
        }
    }
}

/// Ops/s over the last second, from samples of the acked-ops counter.
struct Rate {
    samples: std::collections::VecDeque<(Instant, u64)>,
}

impl Rate {
    fn new() -> Self {
        Rate {
            samples: Default::default(),
        }
    }

    fn add(&mut self, ops: u64) -> f64 {
        let now = Instant::now();
        self.samples.push_back((now, ops));
        while self
            .samples
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > Duration::from_secs(1))
        {
            self.samples.pop_front();
        }
        match (self.samples.front(), self.samples.back()) {
            (Some((t0, o0)), Some((t1, o1))) if t1 > t0 => {
                (o1 - o0) as f64 / t1.duration_since(*t0).as_secs_f64()
            }
            _ => 0.0,
        }
    }
}

/// The progress line of the load phases.
fn status_line(ops_per_s: f64, st: &crate::client::LoadStats) -> String {
    let mut line = format!("{ops_per_s:>7.0} ops/s  {} acked writes", st.ops);
    if st.oom > 0 {
        line.push_str(&format!(", {} refused (OOM: the store is full)", st.oom));
    }
    line
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// `ftvm demo`: see the [module docs](self); `--shared-disk` gives both sides one disk image and
/// reads every acknowledged write back a second time from `kv` booted alone on it.
///
/// # Errors
/// Not root / no KVM (with the reason), setup failures, the backup not going live, a check that
/// cannot be made. Lost writes are not an error: the summary is printed and the process exits
/// with status 1.
pub fn demo(args: DemoArgs) -> anyhow::Result<()> {
    if let Some(r) = crate::scenario::missing() {
        bail!("ftvm demo cannot run here: {r}");
    }
    handle_signals()?;
    let summary = run(&args)?;
    print_summary(&summary);
    if let Some(p) = &args.report {
        std::fs::write(p, serde_json::to_vec_pretty(&summary)?)
            .with_context(|| format!("cannot write {}", p.display()))?;
    }
    if summary.lost() > 0 {
        eprintln!("FAILED: {} acknowledged writes lost", summary.lost());
        std::process::exit(1);
    }
    Ok(())
}

fn run(args: &DemoArgs) -> anyhow::Result<DemoSummary> {
    let p = Progress::new(args.quiet);
    let ftvm = std::env::current_exe().context("cannot find the ftvm executable")?;
    let mut config = ScenarioConfig::new(ftvm, "demo");
    config.transport = args.transport.clone();
    config.arbiter = match args.arbiter.as_deref() {
        // A local etcd the scenario starts.
        Some(local @ ("etcd" | "etcd3")) => Some(local.to_string()),
        Some(spec) => Some(crate::cli::arbiter_spec(spec)?),
        None => None,
    };
    config.fail_timeout_ms = args.fail_timeout;
    config.log = args.child_log.clone();
    config.shared_disk = args.shared_disk;
    p.phase("setup");
    p.line(format!(
        "ftvm demo: kv primary + backup ({} transport, {} arbiter, {}), {} clients",
        args.transport,
        args.arbiter.as_deref().unwrap_or("file"),
        if args.shared_disk {
            "one shared disk"
        } else {
            "a disk copy each"
        },
        args.clients
    ));
    if args.cycles == 0 {
        bail!("--cycles must be at least 1");
    }
    if args.cycles > 1 && !matches!(args.transport.as_str(), "tcp" | "tcp-spin" | "uring") {
        bail!(
            "--cycles {}: re-protection needs --transport tcp, tcp-spin or uring (the join's connection carries the log)",
            args.cycles
        );
    }
    let mut s = Scenario::prepare(config)?;
    p.line(format!(
        "  namespace {}, TAP {} at 10.0.2.1/24, files in {}, arbiter {}",
        s.netns().name(),
        crate::scenario::TAP,
        s.dir().display(),
        s.arbiter_spec()
    ));
    let mut echo = Echo { seen: [0, 0] };
    let metrics = |side: Side| vec!["--metrics".to_string(), metrics_addr(side)];
    let mut backup_args = metrics(Side::Backup);
    if args.cycles > 1 {
        backup_args.extend(accept_join(0));
    }
    s.backup = Some(s.spawn(Side::Backup, &backup_args)?);
    s.primary = Some(s.spawn(Side::Primary, &metrics(Side::Primary))?);
    p.phase("boot");
    p.status("waiting for kv to answer PING".into());
    let boot_deadline = Instant::now() + Duration::from_secs(30);
    loop {
        check_interrupted()?;
        echo.show(&p, [s.primary.as_ref(), s.backup.as_ref()]);
        check_running(&mut s, &[Side::Primary, Side::Backup])?;
        if s.wait_ready(Duration::from_millis(200)).is_ok() {
            break;
        }
        if Instant::now() >= boot_deadline {
            bail!("kv did not answer PING within 30 s\n{}", s.stderr_of_both());
        }
    }
    p.line("  kv answers through the primary (replies released under the output rule)");

    let checker = Arc::new(Checker::default());
    let mut load = Load::start(
        &LoadConfig {
            netns: Some(s.netns().name().to_string()),
            addr: Scenario::guest_addr(),
            threads: args.clients.max(1),
            timeout: Duration::from_secs(5),
            prefix: "demo".into(),
        },
        checker.clone(),
    )?;
    let mut rate = Rate::new();
    let t_load = Instant::now();
    p.phase("replicated");
    let kill_at = t_load + Duration::from_secs_f64(args.kill_after.max(0.5));
    let mut live = LiveStatus::default();
    while Instant::now() < kill_at {
        check_interrupted()?;
        echo.show(&p, [s.primary.as_ref(), s.backup.as_ref()]);
        let st = load.stats();
        p.status(status_line(rate.add(st.ops), &st));
        check_running(&mut s, &[Side::Primary, Side::Backup])?;
        live.tick(&s, &p, true);
        std::thread::sleep(Duration::from_millis(100));
    }
    let before = load.stats();
    let before_secs = t_load.elapsed().as_secs_f64();

    let mut cycles = Vec::new();
    let (mut failover, mut live_line, mut at_first, mut first_reply) =
        (Duration::ZERO, None, before, Instant::now());
    for cycle in 0..args.cycles {
        // The fault.
        p.phase("failover");
        let t_kill = Instant::now();
        let mut primary = s.primary.take().context("no primary")?;
        echo.show(&p, [Some(&primary), s.backup.as_ref()]);
        primary.kill();
        let t_gone = Instant::now();
        load.mark(t_gone);
        p.line(format!(
            "  SIGKILL primary (pid {}) after {:.1} s of load ({} acked writes); gone after {:.1} ms",
            primary.pid(),
            before_secs,
            before.ops,
            ms(t_gone - t_kill)
        ));
        drop(primary);
        let mut live_line_now = None;
        let first_reply_now = loop {
            check_interrupted()?;
            let backup = s.backup.as_mut().context("no backup")?;
            echo.show(&p, [None, Some(backup)]);
            if live_line_now.is_none() && backup.find_line("LIVE").is_some() {
                live_line_now = Some(t_kill.elapsed());
            }
            if let Some(t) = load.first_reply_after_mark() {
                break t;
            }
            if let Some(st) = backup.try_status() {
                bail!(
                    "the backup exited instead of going live ({st})\n{}",
                    s.stderr_of_both()
                );
            }
            if t_kill.elapsed() > Duration::from_secs(30) {
                bail!(
                    "no client reply within 30 s of killing the primary (the backup did not go live)\n{}",
                    s.stderr_of_both()
                );
            }
            p.status(format!(
                "{:>7.0} ops/s  waiting for the backup to go live ({:.0} ms)",
                rate.add(load.stats().ops),
                ms(t_kill.elapsed())
            ));
            std::thread::sleep(Duration::from_millis(2));
        };
        let failover_now = first_reply_now - t_kill;
        let at_first_now = load.stats();
        p.line(format!(
            "  first client reply from the new primary {:.0} ms after the kill",
            ms(failover_now)
        ));

        p.phase("live");
        let end = first_reply_now + Duration::from_secs_f64(args.run_after.max(0.5));
        while Instant::now() < end {
            check_interrupted()?;
            let backup = s.backup.as_mut().context("no backup")?;
            echo.show(&p, [None, Some(backup)]);
            if live_line_now.is_none() && backup.find_line("LIVE").is_some() {
                live_line_now = Some(t_kill.elapsed());
            }
            let st = load.stats();
            p.status(status_line(rate.add(st.ops), &st));
            check_running(&mut s, &[Side::Backup])?;
            live.tick(&s, &p, false);
            std::thread::sleep(Duration::from_millis(100));
        }
        if cycle == 0 {
            (failover, at_first) = (failover_now, at_first_now);
        }
        (live_line, first_reply) = (live_line_now, first_reply_now);
        let mut c = CycleSummary {
            failover_ms: ms(failover_now),
            reprotect_pause_ms: None,
            reprotect_s: None,
        };
        if cycle + 1 < args.cycles {
            p.phase("reprotect");
            let (pause, took) = reprotect(&mut s, &p, cycle)?;
            c.reprotect_pause_ms = Some(pause);
            c.reprotect_s = Some(took.as_secs_f64());
            // Replicated again: load on the new pair before its primary is killed.
            p.phase("replicated");
            let until = Instant::now() + Duration::from_secs_f64(args.kill_after.max(0.5));
            while Instant::now() < until {
                check_interrupted()?;
                let st = load.stats();
                p.status(status_line(rate.add(st.ops), &st));
                check_running(&mut s, &[Side::Primary, Side::Backup])?;
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        cycles.push(c);
    }
    let load_errors = load.last_error();
    let after_secs = first_reply.elapsed().as_secs_f64();
    let end_stats = load.stop();
    let after_ops = end_stats.ops.saturating_sub(at_first.ops);

    p.phase("check");
    p.status(format!(
        "reading back {} acknowledged writes",
        checker.len()
    ));
    let check = read_back(&s, &checker)?;
    p.line(format!(
        "  {} acknowledged writes read back, {} lost",
        check.checked, check.lost
    ));

    p.phase("shutdown");
    s.shutdown_guest();
    let backup_status = s
        .backup
        .as_mut()
        .and_then(|b| b.wait_exit(Duration::from_secs(15)));
    echo.show(&p, [None, s.backup.as_ref()]);
    if backup_status.is_none() {
        if let Some(b) = s.backup.as_mut() {
            b.kill();
        }
        p.line("  the new primary did not power off within 15 s (killed)");
    }
    // The side live at the end: the first backup, or the last joiner (`--cycles`).
    let backup_report = match args.cycles {
        0 | 1 => s.report(Side::Backup),
        n => s.report_of(&format!("j{}", n - 2)),
    };
    let backup_golive = backup_report
        .as_ref()
        .and_then(|r| r.get("golive").cloned());
    let shared_disk = if s.shared_disk() {
        p.phase("disk");
        Some(check_shared_disk(&s, &checker, &p, backup_report.as_ref())?)
    } else {
        None
    };
    p.finish();
    if let Some(e) = load_errors {
        tracing::info!(last_error = %e, "client errors during the run");
    }
    Ok(DemoSummary {
        transport: args.transport.clone(),
        arbiter: s.arbiter_spec().to_string(),
        disk_mode: if s.shared_disk() {
            "shared"
        } else {
            "own-copy"
        }
        .into(),
        ops_per_s_before: before.ops as f64 / before_secs.max(1e-9),
        ops_per_s_after: after_ops as f64 / after_secs.max(1e-9),
        failover_ms: ms(failover),
        live_line_ms: live_line.map(ms),
        backup_golive,
        acked_writes_checked: check.checked,
        acked_writes_lost: check.lost,
        lost_examples: check.examples,
        throttle_actuator: live.actuator.clone(),
        throttle_min_share: live.min_share,
        client_errors: end_stats.errors,
        oom_replies: end_stats.oom,
        acked_writes: end_stats.ops,
        shared_disk,
        cycles,
    })
}

/// Shared-disk mode, once both sides are gone: the image as the new primary left it, then `kv`
/// booted alone on it (`ftvm run`) reading back every acknowledged write from the store its
/// log recovered, and powered off.
fn check_shared_disk(
    s: &Scenario,
    checker: &Checker,
    p: &Progress,
    backup_report: Option<&serde_json::Value>,
) -> anyhow::Result<SharedDiskSummary> {
    let image = s.disk(Side::Backup);
    let image_bytes = std::fs::metadata(&image)
        .with_context(|| format!("cannot read {}", image.display()))?
        .len();
    let field = |k: &str| {
        backup_report
            .and_then(|r| r.get(k))
            .filter(|v| !v.is_null())
    };
    let digest_at_power_off = field("disk_digest").and_then(|v| v.as_str().map(String::from));
    let backup_disk = field("shared_disk").cloned();
    p.status("booting kv alone on the shared image".into());
    let mut alone = s.spawn_alone(&image)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        check_interrupted()?;
        if let Ok(Reply::Simple(r)) = s.command(&[b"PING"], Duration::from_secs(1)) {
            if r == "PONG" {
                break;
            }
        }
        if let Some(st) = alone.try_status() {
            bail!(
                "kv booted alone on the shared image exited ({st})\n{}",
                alone.stderr_text()
            );
        }
        if Instant::now() >= deadline {
            bail!(
                "kv booted alone on the shared image did not answer PING within 30 s\n{}",
                alone.stderr_text()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let console = s.console(None);
    let keys_recovered = console.lines().find_map(|l| {
        l.strip_suffix(" keys recovered")?
            .rsplit(' ')
            .next()?
            .parse()
            .ok()
    });
    p.status(format!(
        "reading back {} acknowledged writes from the shared image",
        checker.len()
    ));
    let check = read_back(s, checker)?;
    p.line(format!(
        "  kv booted alone on the shared image: {} keys recovered; {} acknowledged writes read back, {} lost",
        keys_recovered.map_or("?".to_string(), |k: u64| k.to_string()),
        check.checked,
        check.lost
    ));
    s.shutdown_guest();
    if alone.wait_exit(Duration::from_secs(15)).is_none() {
        p.line("  kv alone did not power off within 15 s (killed)");
    }
    Ok(SharedDiskSummary {
        image_bytes,
        digest_at_power_off,
        backup_disk,
        keys_recovered,
        acked_writes_checked: check.checked,
        acked_writes_lost: check.lost,
        lost_examples: check.examples,
    })
}

/// Reads every acknowledged write back from the guest (inside the scenario's namespace).
fn read_back(s: &Scenario, checker: &Checker) -> anyhow::Result<crate::client::CheckReport> {
    s.in_netns(|| -> anyhow::Result<_> {
        let mut c = RespConn::connect(Scenario::guest_addr(), Duration::from_secs(10))?;
        Ok(checker.verify(&mut c)?)
    })?
}

fn print_summary(s: &DemoSummary) {
    eprintln!("--- ftvm demo summary ---");
    eprintln!("transport            {}", s.transport);
    eprintln!("arbiter              {}", s.arbiter);
    match &s.shared_disk {
        None => eprintln!(
            "disk                 {} (each side its own image)",
            s.disk_mode
        ),
        Some(d) => {
            eprintln!(
                "disk                 {} (one image, --shared-disk): {} bytes, digest {} at power-off",
                s.disk_mode,
                d.image_bytes,
                d.digest_at_power_off.as_deref().unwrap_or("?")
            );
        }
    }
    eprintln!(
        "throughput           {:.0} ops/s before (replicated), {:.0} ops/s after (new primary, alone)",
        s.ops_per_s_before, s.ops_per_s_after
    );
    eprintln!(
        "failover             {:.0} ms (SIGKILL → first client reply from the new primary)",
        s.failover_ms
    );
    if s.cycles.len() > 1 {
        for (i, c) in s.cycles.iter().enumerate() {
            eprintln!(
                "cycle {:<2}             failover {:.0} ms{}",
                i + 1,
                c.failover_ms,
                match (c.reprotect_pause_ms, c.reprotect_s) {
                    (Some(p), Some(t)) =>
                        format!("; re-protected in {t:.2} s, paused {p:.1} ms at the cut"),
                    _ => String::new(),
                }
            );
        }
    }
    if let Some(g) = &s.backup_golive {
        eprintln!("backup go-live       {g}");
    }
    eprintln!(
        "acked writes         {} checked, {} lost",
        s.acked_writes_checked, s.acked_writes_lost
    );
    for e in &s.lost_examples {
        eprintln!("  lost: {e}");
    }
    if let Some(d) = &s.shared_disk {
        if let Some(c) = &d.backup_disk {
            let n = |k: &str| c.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
            eprintln!(
                "backup's disk        dropped {} write requests of the primary while replaying, wrote {} after going live, redid {} at go-live",
                n("dropped"),
                n("writes"),
                n("redone")
            );
        }
        eprintln!(
            "from the disk        {} keys recovered by kv booted alone on the image; {} acked writes checked, {} lost",
            d.keys_recovered.map_or("?".to_string(), |k| k.to_string()),
            d.acked_writes_checked,
            d.acked_writes_lost
        );
        for e in &d.lost_examples {
            eprintln!("  lost: {e}");
        }
    }
    match (&s.throttle_actuator, s.throttle_min_share) {
        (Some(a), Some(m)) => eprintln!(
            "throttle             {a} (the primary's vCPU share went down to {m:.2} before the kill)"
        ),
        (Some(a), None) => eprintln!("throttle             {a}"),
        _ => eprintln!("throttle             unknown (the primary's metrics never answered)"),
    }
    eprintln!("client errors        {}", s.client_errors);
    if s.oom_replies > 0 {
        eprintln!(
            "oom replies          {} (writes refused by the full store: not acknowledged)",
            s.oom_replies
        );
    }
}

/// `--accept-join` for the side that goes live in cycle `cycle` (a port of its own each).
fn accept_join(cycle: u16) -> Vec<String> {
    vec![
        "--accept-join".into(),
        format!("127.0.0.1:{}", JOIN_PORT + 1 + cycle),
    ]
}

/// After failover `cycle`: a new backup (`j<cycle>`) joins the side that went live (which
/// accepts joins since `accept_join(cycle)`), accepting joins itself for the next cycle; it
/// becomes the backup, the live side the primary. Returns the pause at the cut (ms, from the
/// live side's `REPROTECTED` line) and how long the join took.
fn reprotect(s: &mut Scenario, p: &Progress, cycle: u16) -> anyhow::Result<(f64, Duration)> {
    let name = format!("j{cycle}");
    let t0 = Instant::now();
    let mut joiner = s.spawn_joiner(
        &name,
        (7140 + cycle, JOIN_PORT + 1 + cycle),
        &accept_join(cycle + 1),
    )?;
    let live = s.backup.as_mut().context("no live side")?;
    let done = loop {
        check_interrupted()?;
        if let (Some(d), Some(_)) = (
            live.find_line("REPROTECTED"),
            joiner.find_line("replaying from exit"),
        ) {
            break d;
        }
        if let Some(st) = joiner.try_status() {
            bail!(
                "the new backup {name} exited ({st})
{}",
                joiner.stderr_text()
            );
        }
        if t0.elapsed() > Duration::from_secs(60) {
            bail!(
                "{name} did not join within 60 s
{}
{}",
                joiner.stderr_text(),
                live.stderr_text()
            );
        }
        p.status(format!(
            "{name} joining the live side ({:.1} s)",
            t0.elapsed().as_secs_f64()
        ));
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = t0.elapsed();
    let pause = done
        .split("pause ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(f64::NAN);
    p.line(format!(
        "  re-protected: {name} joined in {:.2} s, the guest paused {pause:.1} ms at the cut",
        took.as_secs_f64()
    ));
    s.primary = s.backup.take();
    s.backup = Some(joiner);
    Ok((pause, took))
}

/// The `--metrics` address of `side` inside the demo's namespace.
fn metrics_addr(side: Side) -> String {
    match side {
        Side::Primary => "127.0.0.1:9102".into(),
        Side::Backup => "127.0.0.1:9101".into(),
    }
}

/// Fails at once when one of `sides` has exited (it should still be running).
fn check_running(s: &mut Scenario, sides: &[Side]) -> anyhow::Result<()> {
    for side in sides {
        let node = match side {
            Side::Primary => s.primary.as_mut(),
            Side::Backup => s.backup.as_mut(),
        };
        if let Some(st) = node.and_then(Node::try_status) {
            bail!(
                "the {} exited early ({st})\n{}",
                side.name(),
                s.stderr_of_both()
            );
        }
    }
    Ok(())
}

/// The one-line live status printed every second while the clients run, read from both
/// sides' metrics endpoints (inside the namespace).
#[derive(Default)]
struct LiveStatus {
    last: Option<Instant>,
    actuator: Option<String>,
    min_share: Option<f64>,
}

impl LiveStatus {
    fn tick(&mut self, s: &Scenario, p: &Progress, primary: bool) {
        if self
            .last
            .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            return;
        }
        self.last = Some(Instant::now());
        let get = |side: Side| {
            let addr = metrics_addr(side);
            s.in_netns(move || {
                crate::metrics::http_get(&addr, "/status.json", Duration::from_millis(300))
                    .ok()
                    .and_then(|b| serde_json::from_str::<Snapshot>(&b).ok())
            })
            .ok()
            .flatten()
        };
        let ps = primary.then(|| get(Side::Primary)).flatten();
        let bs = get(Side::Backup);
        if let Some(t) = ps.as_ref().and_then(|x| x.throttle.as_ref()) {
            self.actuator = Some(t.actuator.clone());
            self.min_share = Some(t.min_share);
        }
        let line = crate::stat::one_line(ps.as_ref(), bs.as_ref());
        if !line.is_empty() {
            p.line(format!("  status: {line}"));
        }
    }
}
