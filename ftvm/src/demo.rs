//! `ftvm demo`: a primary and a backup of `kv` on this machine, client load, SIGKILL of the
//! primary mid-load, the backup going live, and a check that every acknowledged write survived.
//!
//! ```text
//! phase      replicated ───────── kill ── failover ── live ───────── check ── shutdown
//! clients    SET k v (+OK → acked)         (waiting)   SET k v ...     GET every acked key
//! primary    records, ships the log   ✗ SIGKILL
//! backup     replays                       detects, wins generation 2, attaches the TAP, runs
//! ```
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

use crate::client::{Checker, Load, LoadConfig, RespConn};
use crate::scenario::{Node, Scenario, ScenarioConfig, Side};

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
}

/// The summary of a demo run (`--report`).
#[derive(Debug, Clone, Serialize)]
pub struct DemoSummary {
    /// Transport of the log.
    pub transport: String,
    /// Arbiter spec used.
    pub arbiter: String,
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
    /// Client errors (connection failures, timeouts) during the whole run.
    pub client_errors: u64,
    /// Acknowledged SETs in all.
    pub acked_writes: u64,
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
                    p.line(format!("  [{}] {l}", n.side().name()));
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

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Accepts `etcd://HOST:PORT` (as documented for `--arbiter`) besides the forms
/// `ftvm_vmm_core::ft::arbiter::open` takes.
pub fn arbiter_spec(spec: &str) -> String {
    match spec.strip_prefix("etcd://") {
        Some(hosts) => {
            let urls: Vec<String> = hosts.split(',').map(|h| format!("http://{h}")).collect();
            format!("etcd:{}", urls.join(","))
        }
        None => spec.to_string(),
    }
}

/// `ftvm demo`.
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
    if summary.acked_writes_lost > 0 {
        eprintln!(
            "FAILED: {} acknowledged writes lost",
            summary.acked_writes_lost
        );
        std::process::exit(1);
    }
    Ok(())
}

fn run(args: &DemoArgs) -> anyhow::Result<DemoSummary> {
    let p = Progress::new(args.quiet);
    let ftvm = std::env::current_exe().context("cannot find the ftvm executable")?;
    let mut config = ScenarioConfig::new(ftvm, "demo");
    config.transport = args.transport.clone();
    config.arbiter = args.arbiter.as_deref().map(arbiter_spec);
    config.fail_timeout_ms = args.fail_timeout;
    config.log = args.child_log.clone();
    p.phase("setup");
    p.line(format!(
        "ftvm demo: kv primary + backup ({} transport, {} arbiter), {} clients",
        args.transport,
        args.arbiter.as_deref().unwrap_or("file"),
        args.clients
    ));
    let mut s = Scenario::prepare(config)?;
    p.line(format!(
        "  namespace {}, TAP {} at 10.0.2.1/24, files in {}, arbiter {}",
        s.netns().name(),
        crate::scenario::TAP,
        s.dir().display(),
        s.arbiter_spec()
    ));
    let mut echo = Echo { seen: [0, 0] };
    s.backup = Some(s.spawn(Side::Backup, &[])?);
    s.primary = Some(s.spawn(Side::Primary, &[])?);
    p.phase("boot");
    p.status("waiting for kv to answer PING".into());
    let boot_deadline = Instant::now() + Duration::from_secs(30);
    loop {
        check_interrupted()?;
        echo.show(&p, [s.primary.as_ref(), s.backup.as_ref()]);
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
    while Instant::now() < kill_at {
        check_interrupted()?;
        echo.show(&p, [s.primary.as_ref(), s.backup.as_ref()]);
        let st = load.stats();
        p.status(format!(
            "{:>7.0} ops/s  {} acked writes",
            rate.add(st.ops),
            st.ops
        ));
        if let Some(primary) = s.primary.as_mut() {
            if let Some(st) = primary.try_status() {
                bail!("the primary exited early ({st})\n{}", s.stderr_of_both());
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let before = load.stats();
    let before_secs = t_load.elapsed().as_secs_f64();

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
    let mut live_line = None;
    let first_reply = loop {
        check_interrupted()?;
        let backup = s.backup.as_mut().context("no backup")?;
        echo.show(&p, [None, Some(backup)]);
        if live_line.is_none() && backup.find_line("LIVE").is_some() {
            live_line = Some(t_kill.elapsed());
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
    let failover = first_reply - t_kill;
    let at_first = load.stats();
    p.line(format!(
        "  first client reply from the new primary {:.0} ms after the kill",
        ms(failover)
    ));

    p.phase("live");
    let end = first_reply + Duration::from_secs_f64(args.run_after.max(0.5));
    while Instant::now() < end {
        check_interrupted()?;
        let backup = s.backup.as_mut().context("no backup")?;
        echo.show(&p, [None, Some(backup)]);
        if live_line.is_none() && backup.find_line("LIVE").is_some() {
            live_line = Some(t_kill.elapsed());
        }
        let st = load.stats();
        p.status(format!(
            "{:>7.0} ops/s  {} acked writes",
            rate.add(st.ops),
            st.ops
        ));
        std::thread::sleep(Duration::from_millis(100));
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
    let check = s.in_netns(|| -> anyhow::Result<_> {
        let mut c = RespConn::connect(Scenario::guest_addr(), Duration::from_secs(10))?;
        Ok(checker.verify(&mut c)?)
    })??;
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
        p.line("  the new primary did not power off within 15 s (killed)");
    }
    let backup_golive = s
        .report(Side::Backup)
        .and_then(|r| r.get("golive").cloned());
    p.finish();
    if let Some(e) = load_errors {
        tracing::info!(last_error = %e, "client errors during the run");
    }
    Ok(DemoSummary {
        transport: args.transport.clone(),
        arbiter: s.arbiter_spec().to_string(),
        ops_per_s_before: before.ops as f64 / before_secs.max(1e-9),
        ops_per_s_after: after_ops as f64 / after_secs.max(1e-9),
        failover_ms: ms(failover),
        live_line_ms: live_line.map(ms),
        backup_golive,
        acked_writes_checked: check.checked,
        acked_writes_lost: check.lost,
        lost_examples: check.examples,
        client_errors: end_stats.errors,
        acked_writes: end_stats.ops,
    })
}

fn print_summary(s: &DemoSummary) {
    eprintln!("--- ftvm demo summary ---");
    eprintln!("transport            {}", s.transport);
    eprintln!("arbiter              {}", s.arbiter);
    eprintln!(
        "throughput           {:.0} ops/s before (replicated), {:.0} ops/s after (new primary, alone)",
        s.ops_per_s_before, s.ops_per_s_after
    );
    eprintln!(
        "failover             {:.0} ms (SIGKILL → first client reply from the new primary)",
        s.failover_ms
    );
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
    eprintln!("client errors        {}", s.client_errors);
}
