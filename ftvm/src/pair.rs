//! `ftvm primary` / `ftvm backup`: a primary and a backup VM in step over the log channel.
//!
//! ```text
//! ftvm backup  --guest kv --disk b.img --net tap:ftvm0 --peer 127.0.0.1:7000 --transport tcp
//! ftvm primary --guest kv --disk a.img --net tap:ftvm0 --peer 127.0.0.1:7000 --transport tcp
//! ```
//! Both start from the same initial state: the digest of guest image, command line, memory size,
//! device set and disk contents is exchanged in the channel handshake and the pair is refused
//! if it differs. The backup listens (TCP, io_uring) or creates the rings (shm) at `--peer`;
//! the primary connects. The backup has no network backend (its transmits are dropped, its
//! receives come from the log) and writes its own copy of the disk — or, with `--shared-disk`
//! on both sides (part of the pairing digest), both name the same image: the primary's writes
//! are outputs (each waits until the backup acknowledged the log so far), the backup does not
//! touch the disk while it replays and owns it once it goes live (`vmm-core/DEVICES.md`).
//! Settings come from the flags and a TOML file (`--config`), merged into one typed
//! configuration per role ([`crate::config`]); what both sides must agree on is compared at the
//! handshake ([`crate::pairing`]). SIGTERM/SIGINT are a planned stop ([`crate::lifecycle`],
//! `ftvm_ft::stop`): the peer is told and does not fail over; the process exits with
//! status 207.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ftvm_channel::{Config, LogReceiver, LogSender, PollerConfig, Refusal, TransportError};
use ftvm_ft::backup::{run_backup, LogReader};
use ftvm_ft::detector::DetectorStats;
use ftvm_ft::error::PairError;
use ftvm_ft::golive::{BackupFtReport, FtConfig};
use ftvm_ft::join::JoinPoint;
use ftvm_ft::primary::{LogWriter, PairOptions, PrimaryHooks};
use ftvm_ft::run::{run_backup_ft, run_primary, run_primary_ft};
use ftvm_ft::stop::{PrimaryStopPolicy, StopCause, Stopped};
use ftvm_ft::throttle::{TargetFollower, Throttle, ThrottleConfig, ThrottleStatus};
use ftvm_ft::transition::GoLiveTimings;
use ftvm_ft::{acquire_with_retry, Acquire, Arbiter, DetectorConfig, NodeId, RetryPolicy, Role};
use ftvm_vmm_core::devices::ConsoleOutput;
use ftvm_vmm_core::digest::{file_digest, pairing_digest};
use ftvm_vmm_core::vm::{buffer_console, Vm, VmConfig};

use crate::config::role_name;
use crate::config::{BackupConfig, CommonConfig, Failover, PrimaryConfig};
use crate::lifecycle::Lifecycle;
use crate::pairing::PairingSettings;
use crate::transport::{backup_incoming, primary_transport};

pub use crate::config::{DEFAULT_FAIL_TIMEOUT_MS, DEFAULT_THROTTLE_TARGET_MS};

/// Exit status of a side that lost the arbiter or was fenced by a newer generation (it
/// released no output after that); the whole table is [`crate::exit`].
pub const EXIT_FENCED: i32 = crate::exit::FENCED;

/// `--shared-disk`: marks the VM's disk as shared with the other side.
fn share_disk(s: &CommonConfig, vm: &Vm) -> anyhow::Result<()> {
    if s.shared_disk {
        vm.disk()
            .context("--shared-disk: the VM has no disk")?
            .set_shared(true);
        eprintln!(
            "shared-disk mode: both sides name {}",
            s.disk.as_deref().unwrap_or(Path::new("?")).display()
        );
    }
    Ok(())
}

fn disk_json(vm: &Vm) -> serde_json::Value {
    match vm.shared_disk() {
        Some(d) => {
            let c = d.counters();
            serde_json::json!({
                "reads": c.reads, "writes": c.writes, "gated": c.gated, "refused": c.refused,
                "dropped": c.dropped, "redone": c.redone,
            })
        }
        _ => serde_json::Value::Null,
    }
}

fn channel_config(s: &CommonConfig, elf: &[u8], role: Role) -> anyhow::Result<Config> {
    // The device set is part of the initial state: whether a virtio-net device exists. The
    // rest both sides must agree on (disk mode, failover settings) travels in the settings
    // blob, compared field by field so that a refusal names what differs.
    let cmdline = format!("{}\0net={}", s.cmdline, s.net.is_some());
    let digest = pairing_digest(elf, &cmdline, s.mem.0, s.disk.as_deref())
        .context("cannot read the disk image for the pairing digest")?;
    let cpuid = ftvm_vmm_core::kvm::KvmContext::new()
        .ok()
        .map(|k| k.cpuid_digest());
    let settings = PairingSettings::new(role, s).with_cpuid(cpuid);
    Ok(Config {
        digest,
        generation: settings.generation,
        settings: settings.to_blob().context("pairing settings")?,
        check_settings: Some(settings.channel_check()),
        ..Config::default()
    })
}

/// Exits with [`crate::exit::PAIRING_REFUSED`] when `e` is a refused handshake (the message
/// names what differs; the peer says the same); any other error is returned.
fn refused_or(who: &str, e: TransportError) -> anyhow::Error {
    if let TransportError::Refused { reason, .. } = e {
        let hint = match reason {
            Refusal::Digest => " (guest, memory, command line, device set and disk contents must be the same on both sides)",
            _ => "",
        };
        eprintln!("{who}: PAIRING REFUSED: {e}{hint}");
        std::process::exit(crate::exit::PAIRING_REFUSED);
    }
    anyhow::Error::new(e)
}

fn write_report(path: &Option<PathBuf>, value: &serde_json::Value) -> anyhow::Result<()> {
    if let Some(p) = path {
        std::fs::write(p, serde_json::to_vec_pretty(value)?)
            .with_context(|| format!("cannot write {}", p.display()))?;
    }
    Ok(())
}

fn console_file(path: &Option<PathBuf>) -> anyhow::Result<Option<std::fs::File>> {
    path.as_ref()
        .map(|p| std::fs::File::create(p).with_context(|| format!("cannot create {}", p.display())))
        .transpose()
}

/// `ftvm primary`.
///
/// # Errors
/// Setup failures, a refused pairing, a VM or log failure.
pub fn primary(pc: PrimaryConfig, lifecycle: &mut Lifecycle) -> anyhow::Result<()> {
    let s = &pc.common;
    let failover = s.failover(Role::Primary);
    let arbiter = failover
        .as_ref()
        .map(|ft| start_check(ft, Role::Primary))
        .transpose()?;
    let guest = s.guest()?;
    let elf = crate::load_guest(guest)?;
    let cfg = channel_config(s, &elf, Role::Primary)?;
    let (console, buf) = buffer_console();
    let config = VmConfig {
        mem_size: s.mem.0,
        cmdline: s.cmdline.clone(),
        disk: s.disk.clone(),
        tap: s.tap(),
        net_without_backend: false,
        console,
    };
    let mut vm = Vm::new(&config, &elf).with_context(|| format!("cannot start {guest}"))?;
    share_disk(s, &vm)?;
    let (p, c) = ftvm_ringbuf::with_capacity(s.log_capacity()?).context("log buffer")?;
    let transport = primary_transport(s)?;
    let poller = PollerConfig {
        core: None,
        idle: s.poll_idle.into(),
    };
    let join_channel = cfg.clone();
    let sender = LogSender::start(p, c, transport, cfg, poller)
        .map_err(|e| refused_or("primary", e))
        .context("cannot pair with the backup (is it running and reachable?)")?;
    eprintln!("primary: paired with the backup, running {guest}");
    let opts = PairOptions {
        digest_interval: pc.digest_interval,
        mem_digest_every: pc.mem_digest_every,
        idle: s.idle.into(),
        ack_timeout: Duration::from_secs(30),
        on_peer_failure: pc.on_backup_failure(),
        on_backup_stop: pc.on_backup_stop(),
        stop_timeout: Duration::from_millis(pc.stop_timeout_ms),
    };
    let writer = LogWriter::new(sender, opts.idle);
    writer.observer().set_transport(s.transport.name());
    let _metrics = crate::metrics::start_if(s.metrics.as_deref(), writer.observer())?;
    lifecycle.attach(
        vm.control(),
        &format!(
            "primary: paired with the backup, generation {}, running {guest}",
            failover.as_ref().map_or(1, |f| f.generation)
        ),
    );
    lifecycle.watch(writer.observer());
    let mut file = console_file(&s.console)?;
    let sink: ftvm_ft::output::Sink = Box::new(move |d: &[u8]| {
        let r = match file.as_mut() {
            Some(f) => std::io::Write::write_all(f, d),
            None => ConsoleOutput::Stdout.write(d),
        };
        if let Err(e) = r {
            tracing::warn!(error = %e, "console write failed");
        }
    });
    let hooks = PrimaryHooks::default();
    let ft = ft_config(failover.as_ref(), arbiter, None)?;
    let join = crate::join::join_point(s);
    let acceptor = crate::join::accept(s, (ft.as_ref(), join.as_ref()), &vm, join_channel)?;
    // The throttle acts on this thread: `run_primary` / `run_primary_ft` run the vCPU here.
    // Once the primary goes on alone its lag source stops replicating and the controller
    // gives the vCPU its full share back.
    let throttle = start_throttle(pc.throttle.config().as_ref(), &writer)?;
    let run = match ft {
        None => run_primary(&mut vm, &writer, &opts, Some((buf, sink)), &hooks)
            .map(|r| (r, serde_json::Value::Null)),
        Some(ft) => {
            let ft = (ft, join);
            run_primary_ft(&mut vm, &writer, &opts, Some((buf, sink)), &hooks, ft).map(|r| {
                let json = serde_json::json!({
                    "generation": r.generation,
                    "alone": r.alone.as_ref().map(timings_json),
                    "detector": detector_json(&r.detector),
                });
                (r.report, json)
            })
        }
    };
    // Stopped before any exit below: it restores full speed and removes its cgroup.
    let throttle_json = throttle_json(
        throttle
            .map(Throttle::stop)
            .ok_or("off (--throttle-target-ms 0)"),
    );
    let (report, ft_json) = match run {
        Ok(r) => r,
        Err(PairError::Superseded { generation, winner }) => fenced(&format!(
            "primary: FENCED: generation {generation} is held by {winner}; stopped, releasing nothing more"
        )),
        Err(e @ PairError::PeerFailed { .. }) => peer_failed("primary", &e),
        Err(PairError::Stopped(st)) => planned_stop(
            "primary",
            &st,
            &s.report,
            serde_json::json!({
                "role": "primary",
                "transport": s.transport.name(),
                "exits": st.exit,
                "entries": writer.entries(),
                "outputs_held": st.held,
                "channel": writer.sender().snapshot(),
                "metrics": writer.observer().snapshot(),
                "throttle": throttle_json,
            }),
        ),
        Err(e) => return Err(anyhow_pair(e)),
    };
    let stats = writer.sender().snapshot();
    let observed = writer.observer().snapshot();
    let secs = report.elapsed.as_secs_f64().max(1e-9);
    let d = &report.outputs.delay_us;
    let disk_digest = s.disk.as_deref().map(file_digest).transpose()?;
    eprintln!(
        "primary: powered off with {} after {} exits; {} entries, {} log bytes ({:.1} Mbit/s); outputs {} released, delay p50 {} µs p99 {} µs",
        report.code,
        report.exits,
        report.entries,
        report.log_bytes,
        report.log_bytes as f64 * 8.0 / secs / 1e6,
        report.outputs.released,
        d.value_at_quantile(0.5),
        d.value_at_quantile(0.99)
    );
    if let Some(w) = &report.disk_waits {
        eprintln!(
            "primary: shared disk: {} writes, {} waited for the backup's ack ({:.1} ms in total, longest {:.3} ms), {} while alone",
            w.writes,
            w.waited,
            ms(w.time),
            ms(w.max),
            w.alone
        );
    }
    write_report(
        &s.report,
        &serde_json::json!({
            "role": "primary",
            "transport": s.transport.name(),
            "code": report.code,
            "exits": report.exits,
            "entries": report.entries,
            "log_bytes": report.log_bytes,
            "elapsed_s": secs,
            "log_mbit_s": report.log_bytes as f64 * 8.0 / secs / 1e6,
            "mem_digest": format!("{:016x}", report.mem_digest),
            "regs_digest": format!("{:016x}", report.regs_digest),
            "disk_digest": disk_digest.map(|d| format!("{d:016x}")),
            "backup_finished": report.backup_finished,
            "outputs_released": report.outputs.released,
            "outputs_early": report.outputs.early,
            "outputs_max_pending": report.outputs.max_pending,
            "output_delay_p50_us": d.value_at_quantile(0.5),
            "output_delay_p99_us": d.value_at_quantile(0.99),
            "output_delay_max_us": d.max(),
            "releases": report.outputs.releases.iter().take(256).collect::<Vec<_>>(),
            "channel": stats,
            "metrics": observed,
            "failover": ft_json,
            "joins": crate::join::joins_json(acceptor.as_ref().map(|(_, j)| j)),
            "throttle": throttle_json,
            "shared_disk": disk_json(&vm),
            "disk_waits": report.disk_waits.map(|w| serde_json::json!({
                "writes": w.writes,
                "waited": w.waited,
                "time_ms": ms(w.time),
                "max_ms": ms(w.max),
                "alone": w.alone,
            })),
        }),
    )?;
    std::process::exit(crate::exit::guest_status(report.code));
}

/// Starts the throttle for the vCPU running on this thread (`None`: turned off). Where no cgroup
/// is writable it runs with the pacer alone (and says so once); it fails only on a broken
/// configuration or when its thread cannot start.
fn start_throttle(
    cfg: Option<&ThrottleConfig>,
    writer: &LogWriter,
) -> anyhow::Result<Option<Throttle>> {
    let Some(cfg) = cfg else {
        return Ok(None);
    };
    let t = Throttle::on_this_thread(cfg, writer, "primary")
        .map_err(|e| anyhow::anyhow!("cannot start the CPU throttle: {}", error_text(&e)))?;
    Ok(Some(t))
}

/// The `"throttle"` object of the primary's report (and of a backup's that went live): the
/// final [`ThrottleStatus`], or why there was none.
fn throttle_json(status: Result<ThrottleStatus, &str>) -> serde_json::Value {
    match status {
        Err(reason) => serde_json::json!({"enabled": false, "reason": reason}),
        Ok(st) => serde_json::json!({
            "enabled": true,
            "actuator": st.actuator.name(),
            "share": st.share,
            "min_share": st.min_share,
            "lag_ms": st.lag_ms,
            "max_lag_ms": st.max_lag_ms,
            "target_ms": st.target_ms,
            "throttled_ms": ms(st.throttled),
            "updates": st.updates,
            "actuator_errors": st.actuator_errors,
        }),
    }
}

use ftvm_vmm_core::error_chain as error_text;

/// Before anything is opened (the TAP above all): a node whose generation is older than the
/// arbiter's newest is a stale survivor of an earlier failover (for instance a killed primary
/// restarted with its old state) and must not run; the primary then takes (or re-takes) its
/// generation. While the arbiter is unreachable, waits ("never go live blind").
fn start_check(ft: &Failover, role: Role) -> anyhow::Result<Arc<dyn Arbiter>> {
    let arbiter: Arc<dyn Arbiter> = Arc::from(
        ftvm_ft::arbiter::open(&ft.arbiter.to_string())
            .with_context(|| format!("--arbiter {}", ft.arbiter))?,
    );
    let node = NodeId::new(ft.node.clone()).context("--node")?;
    let who = role_name(role);
    eprintln!(
        "{who}: failover: arbiter {}, node {node}, generation {}, heartbeats {} <-> {}, fail timeout {} ms",
        ft.arbiter,
        ft.generation,
        ft.heartbeat,
        ft.peer_heartbeat,
        ft.fail_timeout.as_millis()
    );
    let policy = RetryPolicy::default();
    let mut waited = false;
    let current = loop {
        match arbiter.current() {
            Ok(c) => break c,
            Err(e) if e.is_unreachable() => {
                if !waited {
                    eprintln!("{who}: arbiter {} unreachable, waiting: {e}", ft.arbiter);
                    waited = true;
                }
                std::thread::sleep(policy.max);
            }
            Err(e) => return Err(e).context("arbiter"),
        }
    };
    if let Some((g, winner)) = &current {
        if *g > ft.generation {
            fenced(&format!(
                "{who}: FENCED: generation {g} is held by {winner}, this node's generation {} is stale; releasing nothing",
                ft.generation
            ));
        }
    }
    if role == Role::Primary {
        match acquire_with_retry(&*arbiter, ft.generation, &node, policy, || false)
            .context("arbiter")?
        {
            Acquire::Won => {}
            Acquire::Lost { generation, winner } => fenced(&format!(
                "{who}: FENCED: generation {generation} is held by {winner}, not {node}; releasing nothing"
            )),
        }
    }
    Ok(arbiter)
}

/// The golive API's settings, with `--arbiter`; `backup`: the backup's service TAP and what it
/// does when its primary stops as planned.
fn ft_config(
    ft: Option<&Failover>,
    arbiter: Option<Arc<dyn Arbiter>>,
    backup: Option<(Option<String>, PrimaryStopPolicy)>,
) -> anyhow::Result<Option<FtConfig>> {
    let (Some(ft), Some(arbiter)) = (ft, arbiter) else {
        return Ok(None);
    };
    let role = if backup.is_some() {
        Role::Backup
    } else {
        Role::Primary
    };
    let mut detector = DetectorConfig::new(ft.heartbeat, ft.peer_heartbeat, role);
    detector.timeout = ft.fail_timeout;
    detector.interval = detector.interval.min(ft.fail_timeout / 4);
    let mut cfg = FtConfig::new(
        arbiter,
        NodeId::new(ft.node.clone()).context("--node")?,
        ft.generation,
        detector,
    );
    if let Some((tap, on_primary_stop)) = backup {
        cfg.service_tap = tap;
        cfg.on_primary_stop = on_primary_stop;
    }
    // One stderr line per failover transition, whatever the log level (the same timings go
    // into the `--report` JSON from the run's report).
    cfg.on_transition = Some(Arc::new(|t| eprintln!("{t}")));
    Ok(Some(cfg))
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

fn timings_json(t: &GoLiveTimings) -> serde_json::Value {
    serde_json::json!({
        "generation": t.generation,
        "at_exit": t.at_exit,
        "total_ms": ms(t.total),
        "detection_ms": ms(t.detection),
        "drain_ms": ms(t.drain),
        "wait_detector_ms": ms(t.wait_detector),
        "arbiter_ms": ms(t.arbiter),
        "attach_ms": ms(t.attach),
    })
}

fn detector_json(d: &DetectorStats) -> serde_json::Value {
    serde_json::json!({
        "heartbeats_sent": d.heartbeats_sent,
        "heartbeats_received": d.heartbeats_received,
        "stale_heartbeats": d.stale_heartbeats,
        "heartbeats_missed": d.heartbeats_missed,
        "failures_declared": d.failures_declared,
        "last_detection_ms": d.last_detection.map(ms),
    })
}

/// Exits with [`crate::exit::PEER_FAILED`] after saying why: the peer failed and this side,
/// without an arbiter, does not take over.
fn peer_failed(who: &str, e: &PairError) -> ! {
    eprintln!("{who}: PEER FAILED: {}", ftvm_vmm_core::error_chain(e));
    std::process::exit(crate::exit::PEER_FAILED);
}

/// Exits with [`crate::exit::STOPPED`] after a planned stop: one line saying how it went, and
/// the report (`report`, with a `"stopped"` object added).
fn planned_stop(
    who: &str,
    st: &Stopped,
    path: &Option<PathBuf>,
    mut report: serde_json::Value,
) -> ! {
    eprintln!("{who}: STOPPED (planned): {st}");
    report["stopped"] = serde_json::json!({
        "exit": st.exit,
        "cause": match &st.cause {
            StopCause::Requested => "requested".to_string(),
            StopCause::PeerStopped(why) => format!("peer stopped: {why}"),
        },
        "outputs_held": st.held,
        "told_peer": st.told_peer,
    });
    if let Err(e) = write_report(path, &report) {
        eprintln!("{who}: {e:#}");
    }
    std::process::exit(crate::exit::STOPPED);
}

/// Exits with [`EXIT_FENCED`] after printing `msg`.
fn fenced(msg: &str) -> ! {
    eprintln!("{msg}");
    std::process::exit(EXIT_FENCED);
}

fn anyhow_pair(e: PairError) -> anyhow::Error {
    anyhow::anyhow!("{}", ftvm_vmm_core::error_chain(&e))
}

/// `ftvm backup`.
///
/// # Errors
/// Setup failures, a refused pairing; a divergence exits with status 202
/// ([`crate::exit::DIVERGED`]); a backup whose own disk copy failed (it can no longer take over)
/// exits with 206 ([`crate::exit::CANNOT_TAKE_OVER`]).
pub fn backup(bc: BackupConfig, lifecycle: &mut Lifecycle) -> anyhow::Result<()> {
    anyhow::ensure!(
        bc.join.is_none(),
        "ftvm backup --join is a joining backup (ftvm::joiner::backup), not one paired at its start"
    );
    let s = &bc.common;
    let failover = s.failover(Role::Backup);
    let arbiter = failover
        .as_ref()
        .map(|ft| start_check(ft, Role::Backup))
        .transpose()?;
    let guest = s.guest()?;
    let elf = crate::load_guest(guest)?;
    let cfg = channel_config(s, &elf, Role::Backup)?;
    let (console, buf) = buffer_console();
    let config = VmConfig {
        mem_size: s.mem.0,
        cmdline: s.cmdline.clone(),
        disk: s.disk.clone(),
        tap: None,
        net_without_backend: s.net.is_some(),
        console,
    };
    let vm = Vm::new(&config, &elf).with_context(|| format!("cannot start {guest}"))?;
    share_disk(s, &vm)?;
    let (p, c) = ftvm_ringbuf::with_capacity(s.log_capacity()?).context("log buffer")?;
    let mut incoming = backup_incoming(s)?;
    let poller = PollerConfig {
        core: None,
        idle: s.poll_idle.into(),
    };
    let (rx, listened) = LogReceiver::listen(p, c, incoming.as_mut(), cfg.clone(), poller)
        .map_err(|e| refused_or("backup", e))
        .context("cannot pair with the primary")?;
    drop(incoming);
    eprintln!(
        "backup: paired with the primary ({}), replaying {guest}{}",
        listened.paired_with,
        match listened.strays {
            0 => String::new(),
            n => format!(" ({n} stray connection(s) on the logging port dropped before)"),
        }
    );
    let paired = format!(
        "backup: paired with the primary {}, generation {}, replaying {guest}",
        listened.paired_with,
        failover.as_ref().map_or(1, |f| f.generation)
    );
    replay(
        &bc,
        (failover, arbiter),
        (vm, cfg),
        rx,
        buf,
        &paired,
        lifecycle,
    )
}

/// The backup's replay, once paired (`ftvm backup`, and `ftvm backup --join` once the VM was
/// cloned): failover settings, the VM, its log receiver and console buffer; `paired`: the
/// status line.
///
/// # Errors
/// As [`backup`].
pub(crate) fn replay(
    bc: &BackupConfig,
    (failover, arbiter): (Option<Failover>, Option<Arc<dyn Arbiter>>),
    (mut vm, channel): (Vm, Config),
    rx: LogReceiver,
    buf: Arc<std::sync::Mutex<Vec<u8>>>,
    paired: &str,
    lifecycle: &mut Lifecycle,
) -> anyhow::Result<()> {
    let s = &bc.common;
    let reader = LogReader::new(rx, s.idle.into(), None);
    let observer = reader.observer().clone();
    observer.set_transport(s.transport.name());
    let _metrics = crate::metrics::start_if(s.metrics.as_deref(), &observer)?;
    let checks = reader.output_checks();
    lifecycle.attach(vm.control(), paired);
    lifecycle.watch(&observer);
    // Records (and logs) the throttle targets agreed through the log.
    TargetFollower::new().install(reader.controls());
    let ft = ft_config(
        failover.as_ref(),
        arbiter,
        Some((s.tap(), bc.primary_stop_policy())),
    )?;
    // Once live, it runs as a primary with the throttle a primary runs (the lag of the backups
    // that join it, and a join's auto-converge lever).
    let throttle = bc.throttle.config();
    let join = crate::join::join_point(s).map(|p| p.with_throttle(throttle.clone()));
    // Joins are served once this backup went live (and runs as a lone primary).
    let _acceptor = crate::join::accept(s, (ft.as_ref(), join.as_ref()), &vm, channel)?;
    let result = match ft {
        None => run_backup(&mut vm, reader),
        Some(ft) => {
            // After going live, the console output is this node's to release: to --console.
            let mut file = console_file(&s.console)?;
            let sink: ftvm_ft::output::Sink = Box::new(move |d: &[u8]| {
                let r = match file.as_mut() {
                    Some(f) => std::io::Write::write_all(f, d),
                    None => ConsoleOutput::Stdout.write(d),
                };
                if let Err(e) = r {
                    tracing::warn!(error = %e, "console write failed");
                }
            });
            match run_backup_ft(&mut vm, reader, (ft, join.clone()), Some((buf.clone(), sink))) {
                Ok(BackupFtReport::Finished(r)) => Ok(r),
                Ok(BackupFtReport::WentLive(live)) => {
                    let disk_digest = s.disk.as_deref().map(file_digest).transpose()?;
                    eprintln!(
                        "backup: (live as generation {}) powered off with {} after {} exits ({} replayed entries)",
                        live.timings.generation, live.code, live.exits, live.entries
                    );
                    write_report(
                        &s.report,
                        &serde_json::json!({
                            "role": "backup",
                            "went_live": true,
                            "code": live.code,
                            "exits": live.exits,
                            "entries": live.entries,
                            "mem_digest": format!("{:016x}", live.mem_digest),
                            "regs_digest": format!("{:016x}", live.regs_digest),
                            "disk_digest": disk_digest.map(|d| format!("{d:016x}")),
                            "golive": timings_json(&live.timings),
                            "detector": detector_json(&live.detector),
                            "console_released": live.console.released,
                            "outputs_verified": live.outputs_verified,
                            "output_bytes_verified": live.output_bytes_verified,
                            "tx": live.tx,
                            "shared_disk": disk_json(&vm),
                            "metrics": observer.snapshot(),
                            "throttle": throttle_json(live.throttle.ok_or(
                                match (&s.accept_join, &throttle) {
                                    (None, _) => "not a primary serving joins (no --accept-join)",
                                    (_, None) => "off (--throttle-target-ms 0)",
                                    _ => "could not start (see the log)",
                                },
                            )),
                        }),
                    )?;
                    std::process::exit(crate::exit::guest_status(live.code));
                }
                Err(PairError::Superseded { generation, winner }) => fenced(&format!(
                    "backup: FENCED: generation {generation} is held by {winner}; stopped without going live"
                )),
                Err(e) => Err(e),
            }
        }
    };
    // The backup's outputs are dropped; its console replica goes to --console for comparison.
    if let Some(mut f) = console_file(&s.console)? {
        std::io::Write::write_all(&mut f, &buf.lock().unwrap_or_else(|e| e.into_inner()))?;
    }
    let disk_digest = s.disk.as_deref().map(file_digest).transpose()?;
    match result {
        Ok(r) => {
            eprintln!(
                "backup: replayed {} exits ({} entries, {} checkpoints), powered off with {}; waited {:.3} s for the log",
                r.exits,
                r.entries,
                r.checkpoints,
                r.code,
                r.waited.as_secs_f64()
            );
            write_report(
                &s.report,
                &serde_json::json!({
                    "role": "backup",
                    "code": r.code,
                    "exits": r.exits,
                    "entries": r.entries,
                    "checkpoints": r.checkpoints,
                    "mem_digest": format!("{:016x}", r.mem_digest),
                    "regs_digest": format!("{:016x}", r.regs_digest),
                    "disk_digest": disk_digest.map(|d| format!("{d:016x}")),
                    "shared_disk": disk_json(&vm),
                    "metrics": observer.snapshot(),
                    "outputs_verified": r.outputs_verified,
                    "output_bytes_verified": r.output_bytes_verified,
                }),
            )?;
            Ok(())
        }
        // Without an arbiter the backup never goes live (it cannot tell a dead primary from
        // a partitioned one): it replayed everything it received and stops.
        Err(PairError::LogEnded { exit, why }) if failover.is_none() => peer_failed(
            "backup",
            &PairError::PeerFailed {
                peer: "primary",
                exit,
                why,
            },
        ),
        Err(e @ PairError::Diverged { .. }) => {
            // Its state is not the primary's: it must never go live (ftvm_ft::golive, "A
            // backup that diverged"). The primary sees its backup gone and goes on alone.
            eprintln!("backup: {e}");
            eprintln!(
                "backup: this backup can no longer take over (its execution differs from the primary's after {} verified outputs): it stops and will not go live",
                checks.verified_count()
            );
            write_report(
                &s.report,
                &serde_json::json!({
                    "role": "backup",
                    "diverged": e.to_string(),
                    "outputs_verified": checks.verified_count(),
                    "output_bytes_verified": checks.verified_bytes(),
                    "output_mismatches": checks.mismatches(),
                }),
            )?;
            std::process::exit(crate::exit::DIVERGED);
        }
        Err(PairError::Stopped(st)) => planned_stop(
            "backup",
            &st,
            &s.report,
            serde_json::json!({
                "role": "backup",
                "exits": st.exit,
                "disk_digest": disk_digest.map(|d| format!("{d:016x}")),
                "metrics": observer.snapshot(),
                // Stopped after going live, as a primary with its throttle: how it ended.
                "throttle": join
                    .as_ref()
                    .and_then(JoinPoint::throttle_status)
                    .map(|st| throttle_json(Ok(st))),
            }),
        ),
        Err(PairError::CannotTakeOver(f)) => {
            eprintln!(
                "backup: CANNOT TAKE OVER: {f}; stopped without going live (the primary was \
                 told and goes on alone)"
            );
            write_report(
                &s.report,
                &serde_json::json!({"role": "backup", "cannot_take_over": f.to_string()}),
            )?;
            std::process::exit(crate::exit::CANNOT_TAKE_OVER);
        }
        Err(e) => Err(anyhow_pair(e)),
    }
}
