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
//! Settings may come from a TOML file (`--config`, same keys with `_` for `-`); flags override
//! it.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ftvm_channel::reliable::{Accepted, Incoming, OneLink, TcpIncoming, TransportMaker};
use ftvm_channel::shm::ShmTransport;
use ftvm_channel::tcp::{TcpMode, TcpTransport};
use ftvm_channel::uring::{UringConfig, UringTransport};
use ftvm_channel::{
    Config, LogReceiver, LogSender, PollerConfig, Refusal, Transport, TransportError,
};
use ftvm_ringbuf::IdleKind;
use ftvm_vmm_core::devices::ConsoleOutput;
use ftvm_vmm_core::ft::backup::{run_backup, LogReader};
use ftvm_vmm_core::ft::detector::DetectorStats;
use ftvm_vmm_core::ft::digest::{file_digest, pairing_digest};
use ftvm_vmm_core::ft::golive::{
    run_backup_ft, run_primary_ft, BackupFtReport, FtConfig, GoLiveTimings,
};
use ftvm_vmm_core::ft::primary::{
    run_primary, LogWriter, PairError, PairOptions, PeerFailurePolicy, PrimaryHooks,
};
use ftvm_vmm_core::ft::throttle::{
    current_tid, CgroupPlace, TargetFollower, Throttle, ThrottleConfig, ThrottleStatus,
};
use ftvm_vmm_core::ft::{
    acquire_with_retry, Acquire, Arbiter, DetectorConfig, NodeId, RetryPolicy, Role,
};
use ftvm_vmm_core::vm::{buffer_console, Vm, VmConfig};
use serde::Deserialize;

use crate::pairing::PairingSettings;

/// Flags of `ftvm primary` and `ftvm backup` (each may also come from `--config`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct PairArgs {
    /// TOML file with the same settings (keys: guest, mem, disk, shared_disk, net, cmdline, console, peer,
    /// transport, digest_interval, mem_digest_every, log_capacity, report, idle, poll_idle, arbiter, node,
    /// heartbeat, peer_heartbeat, fail_timeout, generation, throttle_target_ms,
    /// throttle_min_share, throttle_cgroup, metrics, go_alone_unprotected).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Guest: an embedded guest name (cpu, kv, stream, nondet) or a static ELF path.
    #[arg(long)]
    pub guest: Option<String>,
    /// Guest RAM size (K/M/G suffix) [default: 64M].
    #[arg(long, value_parser = crate::parse_size)]
    pub mem: Option<u64>,
    /// Raw disk image (the backup writes its own copy; both must start equal), or with
    /// `--shared-disk` the one image both sides name.
    #[arg(long)]
    pub disk: Option<PathBuf>,
    /// Shared-disk mode (both sides must agree; needs `--disk`): the primary and the backup
    /// name the same image. The primary's disk writes are outputs: each waits until the backup
    /// acknowledged the log up to it (counted in the report's `disk_waits`); the backup never
    /// touches the disk while it replays (writes dropped, read data from the log) and owns it
    /// once it goes live.
    #[arg(long)]
    pub shared_disk: bool,
    /// `tap:IFNAME` on the primary; on the backup it gives the device set (no backend while it
    /// replays) and, with `--arbiter`, the service TAP it attaches when it goes live.
    #[arg(long)]
    pub net: Option<String>,
    /// Guest command line.
    #[arg(long)]
    pub cmdline: Option<String>,
    /// Console output file (primary: released under the output rule; backup: its replica).
    #[arg(long)]
    pub console: Option<PathBuf>,
    /// Peer: `HOST:PORT` (tcp, tcp-spin, uring; the backup listens there), a path prefix (shm),
    /// or this side's network interface facing the peer (xdp, e.g. one end of a veth pair).
    #[arg(long)]
    pub peer: Option<String>,
    /// Transport: shm, tcp, tcp-spin, uring or xdp [default: tcp].
    #[arg(long)]
    pub transport: Option<String>,
    /// Exits between register-digest checkpoints (primary) [default: 10000].
    #[arg(long)]
    pub digest_interval: Option<u64>,
    /// Every how many checkpoints guest memory is digested too (0: only at the end; primary)
    /// [default: 0].
    #[arg(long)]
    pub mem_digest_every: Option<u64>,
    /// Log buffer capacity in bytes (power of two; K/M/G suffix) [default: 16M].
    #[arg(long, value_parser = crate::parse_size)]
    pub log_capacity: Option<u64>,
    /// Write a JSON report of the run here.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// How the vCPU waits (the backup for its next log entry, the primary on a full log
    /// buffer): spin, yield, park (spin briefly, then sleep until the log poller delivers —
    /// leaves the CPU to others when the pair shares cores) [default: park].
    #[arg(long)]
    pub idle: Option<String>,
    /// Idle strategy of the log poller threads: spin (dedicated cores), yield, park (the sender
    /// sleeps while everything it sent is acknowledged, woken by the next commit)
    /// [default: park].
    #[arg(long)]
    pub poll_idle: Option<String>,
    /// Failover: the arbiter both sides must win a generation on before going live:
    /// `file:DIR` (an existing shared directory), `etcd://HOST:PORT[,HOST:PORT...][#PREFIX]` or
    /// `etcd:http://HOST:PORT[,...][#PREFIX]`; anything else is refused at start. Without it,
    /// no failover: the pair stops when a side fails.
    #[arg(long)]
    pub arbiter: Option<String>,
    /// This node's name on the arbiter [default: primary / backup].
    #[arg(long)]
    pub node: Option<String>,
    /// Local UDP address of the failure detector's heartbeats [default: 127.0.0.1:7102 on the
    /// primary, 127.0.0.1:7101 on the backup].
    #[arg(long)]
    pub heartbeat: Option<String>,
    /// The peer's heartbeat address [default: the other of the two above].
    #[arg(long)]
    pub peer_heartbeat: Option<String>,
    /// Milliseconds without heartbeats or log traffic after which the peer is presumed failed
    /// [default: 200].
    #[arg(long)]
    pub fail_timeout: Option<u64>,
    /// The generation this pair starts in [default: 1]; a node whose generation is older than
    /// the arbiter's newest is fenced and exits with status 203 ([`crate::exit::FENCED`]).
    #[arg(long)]
    pub generation: Option<u64>,
    /// Primary: keep the backup's execution within this many milliseconds of the primary's by
    /// lowering the primary vCPU's CPU share (a cgroup v2 or v1 `cpu` group plus pauses at the
    /// vCPU's exits; the pauses alone where no cgroup is writable); 0 turns the throttle off
    /// [default: 100].
    #[arg(long)]
    pub throttle_target_ms: Option<u64>,
    /// Serve the live counters over HTTP at this `HOST:PORT`: Prometheus text at `/metrics`,
    /// JSON at `/status.json` (read by `ftvm stat`); from pairing on.
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics: Option<String>,
    /// Primary: where the throttle's cgroup goes: `auto` (under this process's own cgroup in
    /// the cpu controller's hierarchy), a cgroup directory (a delegated one; on cgroup v2 the
    /// process moves into it), or `none` (pauses at exits only) [default: auto].
    #[arg(long, value_name = "auto|none|DIR")]
    pub throttle_cgroup: Option<String>,
    /// Primary: the smallest CPU share the throttle may give the vCPU, in (0, 1] [default: 0.1].
    #[arg(long)]
    pub throttle_min_share: Option<f64>,
    /// Primary without `--arbiter`: when the backup fails, go on alone WITHOUT PROTECTION
    /// (release the held outputs, stop logging, run on with no backup and no failover) instead
    /// of stopping with status 204 ([`crate::exit::PEER_FAILED`]). A backup without an arbiter
    /// never goes live (it cannot tell a dead primary from a partitioned one), so this primary
    /// is then the only live copy.
    #[arg(long)]
    pub go_alone_unprotected: bool,
}

/// Default failure-detection timeout. Failover time ≈ detection (timeout + ≤ 1 heartbeat
/// interval of 10 ms) + arbiter (a few ms) + drain of the received log + TAP attach + the
/// clients' TCP retransmission of what the dead primary never logged (Linux: ≥ 200 ms RTO).
/// 200 ms keeps that sum under 1 s at p50 with room to spare, while staying 20 heartbeat
/// intervals above the scheduling hiccups seen on this 2-core machine under load (tens of ms),
/// so a busy but healthy peer is not declared failed.
pub const DEFAULT_FAIL_TIMEOUT_MS: u64 = 200;

/// Default lag target of the primary's throttle (ms): the design's bound on how far the
/// backup may trail, which also bounds the log it must drain when it goes live.
pub const DEFAULT_THROTTLE_TARGET_MS: u64 = 100;

/// Exit status of a side that lost the arbiter or was fenced by a newer generation (it
/// released no output after that); the whole table is [`crate::exit`].
pub const EXIT_FENCED: i32 = crate::exit::FENCED;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    guest: Option<String>,
    mem: Option<String>,
    disk: Option<PathBuf>,
    shared_disk: Option<bool>,
    net: Option<String>,
    cmdline: Option<String>,
    console: Option<PathBuf>,
    peer: Option<String>,
    transport: Option<String>,
    digest_interval: Option<u64>,
    mem_digest_every: Option<u64>,
    log_capacity: Option<String>,
    report: Option<PathBuf>,
    idle: Option<String>,
    poll_idle: Option<String>,
    arbiter: Option<String>,
    node: Option<String>,
    heartbeat: Option<String>,
    peer_heartbeat: Option<String>,
    fail_timeout: Option<u64>,
    generation: Option<u64>,
    throttle_target_ms: Option<u64>,
    throttle_min_share: Option<f64>,
    go_alone_unprotected: Option<bool>,
    throttle_cgroup: Option<String>,
    metrics: Option<String>,
}

/// Failover settings (with `--arbiter`).
#[derive(Debug, Clone)]
struct FtSettings {
    arbiter: String,
    node: String,
    heartbeat: SocketAddr,
    peer_heartbeat: SocketAddr,
    fail_timeout: Duration,
    generation: u64,
}

/// The merged settings.
#[derive(Debug, Clone)]
struct Settings {
    guest: String,
    mem: u64,
    disk: Option<PathBuf>,
    /// Both sides name the same disk image.
    shared_disk: bool,
    tap: Option<String>,
    cmdline: String,
    console: Option<PathBuf>,
    peer: String,
    transport: String,
    opts: PairOptions,
    /// Idle strategy of the poller threads.
    poll_idle: IdleKind,
    log_capacity: usize,
    report: Option<PathBuf>,
    ft: Option<FtSettings>,
    /// The primary's throttle (`None`: off).
    throttle: Option<ThrottleConfig>,
    /// `--metrics` address.
    metrics: Option<String>,
}

fn socket_addr(flag: &str, s: &str) -> anyhow::Result<SocketAddr> {
    std::net::ToSocketAddrs::to_socket_addrs(s)
        .with_context(|| format!("{flag} {s:?}: not HOST:PORT"))?
        .next()
        .with_context(|| format!("{flag} {s:?}: no address"))
}

/// An idle strategy flag's value (`park` when not given).
fn idle_kind(flag: &str, value: Option<String>) -> anyhow::Result<IdleKind> {
    match value {
        Some(s) => s
            .parse()
            .map_err(|e| anyhow::anyhow!("{flag} {s:?}: {e:?}")),
        None => Ok(IdleKind::Park),
    }
}

fn merge(args: PairArgs, role: Role) -> anyhow::Result<Settings> {
    let file: FileConfig = match &args.config {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read config {}", p.display()))?;
            toml::from_str(&text).with_context(|| format!("bad config {}", p.display()))?
        }
        None => FileConfig::default(),
    };
    let size = |s: Option<String>| -> anyhow::Result<Option<u64>> {
        s.map(|s| crate::parse_size(&s).map_err(anyhow::Error::msg))
            .transpose()
    };
    let guest = args
        .guest
        .or(file.guest)
        .context("--guest is required (flag or config file)")?;
    let peer = args
        .peer
        .or(file.peer)
        .context("--peer is required (flag or config file)")?;
    let net = args.net.or(file.net);
    let tap = match net.as_deref() {
        None => None,
        Some(spec) => match spec.strip_prefix("tap:") {
            Some(name) if !name.is_empty() => Some(name.to_string()),
            _ => bail!("--net {spec:?}: expected tap:IFNAME"),
        },
    };
    let idle = idle_kind("--idle", args.idle.or(file.idle))?;
    let poll_idle = idle_kind("--poll-idle", args.poll_idle.or(file.poll_idle))?;
    let ft = match args.arbiter.or(file.arbiter) {
        None => None,
        Some(spec) => {
            let (me, peer) = match role {
                Role::Backup => ("127.0.0.1:7101", "127.0.0.1:7102"),
                _ => ("127.0.0.1:7102", "127.0.0.1:7101"),
            };
            let heartbeat = args.heartbeat.or(file.heartbeat);
            let peer_heartbeat = args.peer_heartbeat.or(file.peer_heartbeat);
            let generation = args.generation.or(file.generation).unwrap_or(1);
            if generation == 0 {
                bail!("--generation 0: generations start at 1");
            }
            let fail_timeout = args
                .fail_timeout
                .or(file.fail_timeout)
                .unwrap_or(DEFAULT_FAIL_TIMEOUT_MS);
            if fail_timeout <= 20 {
                bail!("--fail-timeout {fail_timeout}: must exceed 20 ms (two heartbeat intervals)");
            }
            Some(FtSettings {
                arbiter: crate::cli::arbiter_spec(&spec)?,
                node: args
                    .node
                    .or(file.node)
                    .unwrap_or_else(|| role_name(role).to_string()),
                heartbeat: socket_addr("--heartbeat", heartbeat.as_deref().unwrap_or(me))?,
                peer_heartbeat: socket_addr(
                    "--peer-heartbeat",
                    peer_heartbeat.as_deref().unwrap_or(peer),
                )?,
                fail_timeout: Duration::from_millis(fail_timeout),
                generation,
            })
        }
    };
    let throttle_target_ms = args
        .throttle_target_ms
        .or(file.throttle_target_ms)
        .unwrap_or(DEFAULT_THROTTLE_TARGET_MS);
    let throttle = if throttle_target_ms == 0 {
        None
    } else {
        let mut cfg = ThrottleConfig {
            target: Duration::from_millis(throttle_target_ms),
            ..ThrottleConfig::default()
        };
        if let Some(m) = args.throttle_min_share.or(file.throttle_min_share) {
            if !(m > 0.0 && m <= 1.0) {
                bail!("--throttle-min-share {m}: must be in (0, 1]");
            }
            cfg.pi.min_share = m;
        }
        cfg.cgroup = match args.throttle_cgroup.or(file.throttle_cgroup).as_deref() {
            None | Some("auto") => CgroupPlace::Auto,
            Some("none") => CgroupPlace::Off,
            Some(dir) => {
                let dir = PathBuf::from(dir);
                if !dir.is_dir() {
                    bail!(
                        "--throttle-cgroup {}: no such directory (auto, none or a cgroup directory)",
                        dir.display()
                    );
                }
                CgroupPlace::At(dir)
            }
        };
        Some(cfg)
    };
    let go_alone_unprotected =
        args.go_alone_unprotected || file.go_alone_unprotected.unwrap_or(false);
    if go_alone_unprotected && (role != Role::Primary || ft.is_some()) {
        bail!("--go-alone-unprotected applies to a primary without --arbiter only");
    }
    let shared_disk = args.shared_disk || file.shared_disk.unwrap_or(false);
    let disk = args.disk.or(file.disk);
    if shared_disk && disk.is_none() {
        bail!("--shared-disk needs --disk (the image both sides name)");
    }
    let log_capacity = args
        .log_capacity
        .or(size(file.log_capacity)?)
        .unwrap_or(16 << 20);
    Ok(Settings {
        guest,
        mem: args.mem.or(size(file.mem)?).unwrap_or(64 << 20),
        disk,
        shared_disk,
        tap,
        cmdline: args.cmdline.or(file.cmdline).unwrap_or_default(),
        console: args.console.or(file.console),
        peer,
        transport: args
            .transport
            .or(file.transport)
            .unwrap_or_else(|| "tcp".into()),
        opts: PairOptions {
            digest_interval: args
                .digest_interval
                .or(file.digest_interval)
                .unwrap_or(10_000),
            mem_digest_every: args.mem_digest_every.or(file.mem_digest_every).unwrap_or(0),
            idle,
            ack_timeout: Duration::from_secs(30),
            on_peer_failure: if go_alone_unprotected {
                PeerFailurePolicy::GoAloneUnprotected
            } else {
                PeerFailurePolicy::Stop
            },
        },
        poll_idle,
        log_capacity: usize::try_from(log_capacity).context("log capacity")?,
        report: args.report.or(file.report),
        ft,
        throttle,
        metrics: args.metrics.or(file.metrics),
    })
}

/// `--shared-disk`: marks the VM's disk as shared with the other side.
fn share_disk(s: &Settings, vm: &Vm) -> anyhow::Result<()> {
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

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Primary => "primary",
        Role::Backup => "backup",
        Role::Alone => "alone",
    }
}

fn channel_config(s: &Settings, elf: &[u8], role: Role) -> anyhow::Result<Config> {
    // The device set is part of the initial state: whether a virtio-net device exists. The
    // rest both sides must agree on (disk mode, failover settings) travels in the settings
    // blob, compared field by field so that a refusal names what differs.
    let cmdline = format!("{}\0net={}", s.cmdline, s.tap.is_some());
    let digest = pairing_digest(elf, &cmdline, s.mem, s.disk.as_deref())
        .context("cannot read the disk image for the pairing digest")?;
    let settings = pairing_settings(s, role);
    Ok(Config {
        digest,
        generation: settings.generation,
        settings: settings.to_blob().context("pairing settings")?,
        check_settings: Some(settings.channel_check()),
        ..Config::default()
    })
}

/// This side's [`PairingSettings`].
fn pairing_settings(s: &Settings, role: Role) -> PairingSettings {
    let ft = s.ft.as_ref();
    PairingSettings {
        role: role_name(role).into(),
        arbiter: ft.map(|f| f.arbiter.clone()),
        node: ft.map(|f| f.node.clone()),
        shared_disk: s.shared_disk,
        heartbeat: ft.map(|f| f.heartbeat),
        peer_heartbeat: ft.map(|f| f.peer_heartbeat),
        fail_timeout_ms: ft.map(|f| f.fail_timeout.as_millis() as u64),
        generation: ft.map_or(1, |f| f.generation),
    }
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

const SHM_CAPACITY: usize = 1 << 22;

/// Where the backup waits for its primary: the logging port (tcp, tcp-spin, uring: every
/// connection is a candidate, strays are dropped and the port keeps listening), or the one
/// link there is (shm: the rings, which it creates afresh; xdp: the interface).
fn backup_incoming(s: &Settings) -> anyhow::Result<Box<dyn Incoming>> {
    let tcp = |make: TransportMaker| -> anyhow::Result<Box<dyn Incoming>> {
        let listener =
            TcpListener::bind(&s.peer).with_context(|| format!("cannot listen on {}", s.peer))?;
        eprintln!("backup: listening on {}", listener.local_addr()?);
        Ok(Box::new(TcpIncoming::new(listener, make)?))
    };
    let one = |transport: Box<dyn Transport>| -> Box<dyn Incoming> {
        Box::new(OneLink(Some(Accepted {
            transport,
            peer: s.peer.clone(),
            source: s.peer.clone(),
            persistent: true,
        })))
    };
    match s.transport.as_str() {
        "tcp" | "tcp-spin" => {
            let mode = if s.transport == "tcp" {
                TcpMode::Blocking
            } else {
                TcpMode::Spin
            };
            tcp(Box::new(move |stream| {
                Ok(Box::new(TcpTransport::from_stream(stream, mode)?) as Box<dyn Transport>)
            }))
        }
        "uring" => tcp(Box::new(|stream| {
            Ok(
                Box::new(UringTransport::from_stream(stream, UringConfig::default())?)
                    as Box<dyn Transport>,
            )
        })),
        "shm" => {
            eprintln!("backup: shm rings at {}", s.peer);
            Ok(one(Box::new(ShmTransport::create(
                Path::new(&s.peer),
                SHM_CAPACITY,
            )?)))
        }
        "xdp" => Ok(one(xdp_transport(s)?)),
        other => bail!("unknown transport {other:?} (shm, tcp, tcp-spin, uring, xdp)"),
    }
}

/// AF_XDP: `--peer` names this side's interface (a veth end or a NIC facing the peer); the
/// channel handshake then pairs the two sides as over any other transport.
#[cfg(feature = "xdp")]
fn xdp_transport(s: &Settings) -> anyhow::Result<Box<dyn Transport>> {
    use ftvm_channel::xdp::{XdpConfig, XdpTransport};
    let t = XdpTransport::open(&XdpConfig::new(&s.peer))
        .with_context(|| format!("cannot open AF_XDP on {}", s.peer))?;
    eprintln!("AF_XDP on {} ({})", s.peer, t.mode());
    Ok(Box::new(t))
}

#[cfg(not(feature = "xdp"))]
fn xdp_transport(_: &Settings) -> anyhow::Result<Box<dyn Transport>> {
    bail!("--transport xdp: this ftvm was built without the `xdp` feature (cargo build --release -p ftvm --features xdp)")
}

fn primary_transport(s: &Settings) -> anyhow::Result<Box<dyn Transport>> {
    let timeout = Duration::from_secs(30);
    let addr = || -> anyhow::Result<std::net::SocketAddr> {
        std::net::ToSocketAddrs::to_socket_addrs(&s.peer)
            .with_context(|| format!("bad peer address {}", s.peer))?
            .next()
            .with_context(|| format!("no address for {}", s.peer))
    };
    match s.transport.as_str() {
        "tcp" => Ok(Box::new(TcpTransport::connect(
            addr()?,
            TcpMode::Blocking,
            timeout,
        )?)),
        "tcp-spin" => Ok(Box::new(TcpTransport::connect(
            addr()?,
            TcpMode::Spin,
            timeout,
        )?)),
        "uring" => {
            let a = addr()?;
            let deadline = Instant::now() + timeout;
            let stream = loop {
                match TcpStream::connect(a) {
                    Ok(st) => break st,
                    Err(_) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(10))
                    }
                    Err(e) => return Err(e).with_context(|| format!("cannot connect to {a}")),
                }
            };
            Ok(Box::new(UringTransport::from_stream(
                stream,
                UringConfig::default(),
            )?))
        }
        "shm" => Ok(Box::new(ShmTransport::open(Path::new(&s.peer), timeout)?)),
        "xdp" => xdp_transport(s),
        other => bail!("unknown transport {other:?} (shm, tcp, tcp-spin, uring, xdp)"),
    }
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
pub fn primary(args: PairArgs) -> anyhow::Result<()> {
    let s = merge(args, Role::Primary)?;
    let arbiter =
        s.ft.as_ref()
            .map(|ft| start_check(ft, Role::Primary))
            .transpose()?;
    let elf = crate::load_guest(&s.guest)?;
    let cfg = channel_config(&s, &elf, Role::Primary)?;
    let (console, buf) = buffer_console();
    let config = VmConfig {
        mem_size: s.mem,
        cmdline: s.cmdline.clone(),
        disk: s.disk.clone(),
        tap: s.tap.clone(),
        net_without_backend: false,
        console,
    };
    let mut vm = Vm::new(&config, &elf).with_context(|| format!("cannot start {}", s.guest))?;
    share_disk(&s, &vm)?;
    let (p, c) = ftvm_ringbuf::with_capacity(s.log_capacity).context("log buffer")?;
    let transport = primary_transport(&s)?;
    let pc = PollerConfig {
        core: None,
        idle: s.poll_idle,
    };
    let sender = LogSender::start(p, c, transport, cfg, pc)
        .map_err(|e| refused_or("primary", e))
        .context("cannot pair with the backup (is it running and reachable?)")?;
    eprintln!("primary: paired with the backup, running {}", s.guest);
    let writer = LogWriter::new(sender, s.opts.idle);
    writer.observer().set_transport(&s.transport);
    let _metrics = crate::metrics::start_if(s.metrics.as_deref(), writer.observer())?;
    let mut file = console_file(&s.console)?;
    let sink: ftvm_vmm_core::ft::output::Sink = Box::new(move |d: &[u8]| {
        let r = match file.as_mut() {
            Some(f) => std::io::Write::write_all(f, d),
            None => ConsoleOutput::Stdout.write(d),
        };
        if let Err(e) = r {
            tracing::warn!(error = %e, "console write failed");
        }
    });
    let hooks = PrimaryHooks::default();
    let ft = ft_config(&s, arbiter, Role::Primary)?;
    // The throttle acts on this thread: `run_primary` / `run_primary_ft` run the vCPU here.
    // Once the primary goes on alone its lag source stops replicating and the controller
    // gives the vCPU its full share back.
    let throttle = start_throttle(s.throttle.as_ref(), &writer)?;
    let run = match ft {
        None => run_primary(&mut vm, &writer, &s.opts, Some((buf, sink)), &hooks)
            .map(|r| (r, serde_json::Value::Null)),
        Some(ft) => {
            run_primary_ft(&mut vm, &writer, &s.opts, Some((buf, sink)), &hooks, ft).map(|r| {
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
            "transport": s.transport,
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
    let t = Throttle::for_writer(cfg.clone(), writer, current_tid())
        .map_err(|e| anyhow::anyhow!("cannot start the CPU throttle: {}", error_text(&e)))?;
    tracing::info!(
        target: "ftvm::throttle",
        target_ms = cfg.target.as_millis() as u64,
        min_share = cfg.pi.min_share,
        actuator = t.actuator(),
        "primary: CPU throttle on"
    );
    Ok(Some(t))
}

/// The `"throttle"` object of the primary's report: the final [`ThrottleStatus`], or why there
/// was none.
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

use ftvm_vmm_core::ft::primary::error_chain as error_text;

/// Before anything is opened (the TAP above all): a node whose generation is older than the
/// arbiter's newest is a stale survivor of an earlier failover (for instance a killed primary
/// restarted with its old state) and must not run; the primary then takes (or re-takes) its
/// generation. While the arbiter is unreachable, waits ("never go live blind").
fn start_check(ft: &FtSettings, role: Role) -> anyhow::Result<Arc<dyn Arbiter>> {
    let arbiter: Arc<dyn Arbiter> = Arc::from(
        ftvm_vmm_core::ft::arbiter::open(&ft.arbiter)
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

/// The golive API's settings, with `--arbiter`.
fn ft_config(
    s: &Settings,
    arbiter: Option<Arc<dyn Arbiter>>,
    role: Role,
) -> anyhow::Result<Option<FtConfig>> {
    let (Some(ft), Some(arbiter)) = (&s.ft, arbiter) else {
        return Ok(None);
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
    if role == Role::Backup {
        cfg.service_tap = s.tap.clone();
    }
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
        "failures_declared": d.failures_declared,
        "last_detection_ms": d.last_detection.map(ms),
    })
}

/// Exits with [`crate::exit::PEER_FAILED`] after saying why: the peer failed and this side,
/// without an arbiter, does not take over.
fn peer_failed(who: &str, e: &PairError) -> ! {
    eprintln!(
        "{who}: PEER FAILED: {}",
        ftvm_vmm_core::ft::primary::error_chain(e)
    );
    std::process::exit(crate::exit::PEER_FAILED);
}

/// Exits with [`EXIT_FENCED`] after printing `msg`.
fn fenced(msg: &str) -> ! {
    eprintln!("{msg}");
    std::process::exit(EXIT_FENCED);
}

fn anyhow_pair(e: PairError) -> anyhow::Error {
    anyhow::anyhow!("{}", ftvm_vmm_core::ft::primary::error_chain(&e))
}

/// `ftvm backup`.
///
/// # Errors
/// Setup failures, a refused pairing; a divergence exits with status 202
/// ([`crate::exit::DIVERGED`]); a backup whose own disk copy failed (it can no longer take over)
/// exits with 206 ([`crate::exit::CANNOT_TAKE_OVER`]).
pub fn backup(args: PairArgs) -> anyhow::Result<()> {
    let s = merge(args, Role::Backup)?;
    let arbiter =
        s.ft.as_ref()
            .map(|ft| start_check(ft, Role::Backup))
            .transpose()?;
    let elf = crate::load_guest(&s.guest)?;
    let cfg = channel_config(&s, &elf, Role::Backup)?;
    let (console, buf) = buffer_console();
    let config = VmConfig {
        mem_size: s.mem,
        cmdline: s.cmdline.clone(),
        disk: s.disk.clone(),
        tap: None,
        net_without_backend: s.tap.is_some(),
        console,
    };
    let mut vm = Vm::new(&config, &elf).with_context(|| format!("cannot start {}", s.guest))?;
    share_disk(&s, &vm)?;
    let (p, c) = ftvm_ringbuf::with_capacity(s.log_capacity).context("log buffer")?;
    let mut incoming = backup_incoming(&s)?;
    let pc = PollerConfig {
        core: None,
        idle: s.poll_idle,
    };
    let (rx, listened) = LogReceiver::listen(p, c, incoming.as_mut(), cfg, pc)
        .map_err(|e| refused_or("backup", e))
        .context("cannot pair with the primary")?;
    drop(incoming);
    eprintln!(
        "backup: paired with the primary ({}), replaying {}{}",
        listened.paired_with,
        s.guest,
        match listened.strays {
            0 => String::new(),
            n => format!(" ({n} stray connection(s) on the logging port dropped before)"),
        }
    );
    let reader = LogReader::new(rx, s.opts.idle, None);
    let observer = reader.observer().clone();
    observer.set_transport(&s.transport);
    let _metrics = crate::metrics::start_if(s.metrics.as_deref(), &observer)?;
    let checks = reader.output_checks();
    // Records (and logs) the throttle targets agreed through the log.
    TargetFollower::new().install(reader.controls());
    let result = match ft_config(&s, arbiter, Role::Backup)? {
        None => run_backup(&mut vm, reader),
        Some(ft) => {
            // After going live, the console output is this node's to release: to --console.
            let mut file = console_file(&s.console)?;
            let sink: ftvm_vmm_core::ft::output::Sink = Box::new(move |d: &[u8]| {
                let r = match file.as_mut() {
                    Some(f) => std::io::Write::write_all(f, d),
                    None => ConsoleOutput::Stdout.write(d),
                };
                if let Err(e) = r {
                    tracing::warn!(error = %e, "console write failed");
                }
            });
            match run_backup_ft(&mut vm, reader, ft, Some((buf.clone(), sink))) {
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
        Err(PairError::LogEnded { exit, why }) if s.ft.is_none() => peer_failed(
            "backup",
            &PairError::PeerFailed {
                peer: "primary",
                exit,
                why,
            },
        ),
        Err(e @ PairError::Diverged { .. }) => {
            // Its state is not the primary's: it must never go live (vmm-core ft::golive, "A
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
