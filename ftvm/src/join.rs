//! Re-protection from the command line: `ftvm primary --accept-join HOST:PORT` accepts a new
//! backup once it runs alone, `ftvm backup --join HOST:PORT` is that backup (no guest image:
//! its VM is cloned from the running primary). The protocol and its safety argument are in
//! `vmm-core` [`ft::join`](ftvm_ft::join).
//!
//! ```text
//! primary: join from joiner (127.0.0.1:41234): generation 3
//! primary: join round 0: 16384 pages (64.0 MB) in 212 ms, 301 MB/s; 310 pages dirtied (1462/s), estimated pause 4.2 ms; 64.0 MB sent; vCPU share 1.00
//! primary: REPROTECTED as generation 3: 2 rounds, 65.3 MB in 0.41 s, pause 2.1 ms (310 pages at the cut, exit 81234, log record 1801; lowest vCPU share 1.00; pause: capture 0.3 ms, harvest 0.4 ms, copy 1.2 ms, rejoin 0.1 ms, header 0.0 ms)
//! backup: joined the primary at 127.0.0.1:7100 as generation 3: 64.0 MB in 0.43 s, replaying from exit 81234
//! ```

use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use ftvm_channel::shm::ShmTransport;
use ftvm_channel::tcp::TcpMode;
use ftvm_channel::{
    Config, LogReceiver, PollerConfig, Transport as ChannelTransport, TransportError,
};
use ftvm_ft::golive::FtConfig;
use ftvm_ft::join::{
    join, JoinAcceptor, JoinError, JoinEvent, JoinLink, JoinOptions, JoinPoint, JoinRequest,
    JoinSummary, OwnLink, RefuseReason, JOIN_VERSION,
};
use ftvm_ft::{Arbiter, Role};
use ftvm_vmm_core::transfer::TransferHandle;
use ftvm_vmm_core::vm::{buffer_console, Vm, VmConfig};

use crate::config::{BackupConfig, CommonConfig, Transport};
use crate::lifecycle::Lifecycle;

/// How long a joiner refused as "not alone" tries again.
const JOIN_PATIENCE: Duration = Duration::from_secs(10);

/// The joins a primary completed (for its report).
pub type Joins = Arc<Mutex<Vec<JoinSummary>>>;

fn resolve(addr: &str) -> anyhow::Result<SocketAddr> {
    addr.to_socket_addrs()
        .with_context(|| format!("bad address {addr}"))?
        .next()
        .with_context(|| format!("no address for {addr}"))
}

/// Which end of a join this process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JoinSide {
    /// The side that accepts joins (`--accept-join`).
    Primary,
    /// `ftvm backup --join`.
    Joiner,
}

/// The logging channel of a joined pair on `side`: over the join connection (tcp,
/// tcp-spin, uring) or a link of its own (shm, xdp: [`OwnLink`] below).
fn link(s: &CommonConfig, side: JoinSide) -> anyhow::Result<JoinLink> {
    Ok(match s.transport {
        Transport::Tcp => JoinLink::Tcp(TcpMode::Blocking),
        Transport::TcpSpin => JoinLink::Tcp(TcpMode::Spin),
        Transport::Uring => JoinLink::Uring,
        Transport::Shm => JoinLink::Own(Arc::new(ShmJoinLink {
            prefix: PathBuf::from(s.peer().context("--transport shm with joins")?),
            side,
        })),
        Transport::Xdp => JoinLink::Own(Arc::new(XdpJoinLink {
            interface: s.peer().context("--transport xdp with joins")?.to_string(),
        })),
    })
}

/// `shm` for a joined pair: rings under `<--peer>.g<generation>` (a per-generation name: the
/// rings a killed backup left under the pair's own prefix are never attached to). The joiner
/// creates them (as a backup does), the primary opens them.
#[derive(Debug)]
struct ShmJoinLink {
    prefix: PathBuf,
    side: JoinSide,
}

impl OwnLink for ShmJoinLink {
    fn open(&self, generation: u64) -> Result<Box<dyn ChannelTransport>, TransportError> {
        let mut prefix = self.prefix.clone().into_os_string();
        prefix.push(format!(".g{generation}"));
        let prefix = PathBuf::from(prefix);
        Ok(match self.side {
            JoinSide::Joiner => Box::new(ShmTransport::create(&prefix, crate::pair::SHM_CAPACITY)?),
            JoinSide::Primary => Box::new(ShmTransport::open(&prefix, Duration::from_secs(10))?),
        })
    }
}

/// `xdp` for a joined pair: each side opens AF_XDP on its own interface (`--peer`), as at a
/// pair's start (the channel's handshake pairs them).
#[derive(Debug)]
struct XdpJoinLink {
    interface: String,
}

impl OwnLink for XdpJoinLink {
    fn open(&self, _generation: u64) -> Result<Box<dyn ChannelTransport>, TransportError> {
        crate::pair::open_xdp(&self.interface)
    }
}

/// The join point to put in a side's failover settings, if it accepts joins.
pub fn join_point(s: &CommonConfig) -> Option<JoinPoint> {
    let capacity = usize::try_from(s.log_capacity.0).ok()?;
    s.accept_join.as_ref().map(|_| JoinPoint::new(capacity))
}

fn mb(b: u64) -> f64 {
    b as f64 / 1e6
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Prints one line per join event (progress, summary, failure) and keeps the summaries.
fn print_event(joins: &Joins, e: &JoinEvent) {
    match e {
        JoinEvent::Accepted {
            node,
            from,
            generation,
        } => eprintln!("primary: join from {node} ({from}): generation {generation}"),
        JoinEvent::Round {
            stats,
            sent,
            estimated_pause,
            share,
        } => eprintln!(
            "primary: join round {}: {} pages ({:.1} MB) in {:.0} ms, {:.0} MB/s; {} pages dirtied ({:.0}/s), estimated pause {:.1} ms; {:.1} MB sent; vCPU share {share:.2}",
            stats.round,
            stats.pages,
            mb(stats.bytes),
            ms(stats.duration),
            mb(stats.bytes) / stats.duration.as_secs_f64().max(1e-6),
            stats.dirty_after,
            stats.dirty_rate(),
            ms(*estimated_pause),
            mb(*sent),
        ),
        JoinEvent::Done(s) => {
            eprintln!(
                "primary: REPROTECTED as generation {}: {} rounds, {:.1} MB in {:.2} s, pause {:.1} ms ({} pages at the cut, exit {}, log record {}; lowest vCPU share {:.2}; pause: capture {:.1} ms, harvest {:.1} ms, copy {:.1} ms, rejoin {:.1} ms, header {:.1} ms)",
                s.generation,
                s.rounds,
                mb(s.bytes),
                s.duration.as_secs_f64(),
                ms(s.pause),
                s.final_pages,
                s.cut_exit,
                s.cut_seq,
                s.min_share,
                ms(s.parts.capture),
                ms(s.parts.harvest),
                ms(s.parts.copy),
                ms(s.parts.rejoin),
                ms(s.parts.header),
            );
            joins.lock().unwrap_or_else(|e| e.into_inner()).push(*s);
        }
        JoinEvent::Failed { error, after_cut } => eprintln!(
            "primary: JOIN FAILED ({}): {error}; {}",
            if *after_cut {
                "after the cut"
            } else {
                "before the cut"
            },
            if *after_cut {
                "going alone again"
            } else {
                "still running alone, a retry may join"
            }
        ),
    }
}

/// `--accept-join`: starts accepting joins for the side running `vm` (served once it runs as
/// a lone primary), with failover settings `ft` (which must carry the [`join_point`]) and the
/// logging channel's parameters `channel`. `None` without `--accept-join`.
///
/// # Errors
/// The address cannot be bound, no arbiter, shm/xdp without `--peer`.
pub fn accept(
    s: &CommonConfig,
    ft: Option<&FtConfig>,
    vm: &Vm,
    channel: Config,
) -> anyhow::Result<Option<(JoinAcceptor, Joins)>> {
    let Some(addr) = s.accept_join.as_deref() else {
        return Ok(None);
    };
    let ft = ft.context("--accept-join needs --arbiter")?;
    let mut opts = JoinOptions::new(channel, s.log_capacity.0);
    opts.link = link(s, JoinSide::Primary)?;
    opts.copy_disk = !s.shared_disk;
    opts.convergence = ftvm_vmm_core::transfer::Convergence::for_link(
        1e9,
        Duration::from_millis(s.join_pause_ms),
        s.join_max_rounds.max(1),
    );
    opts.auto_converge = s.join_auto_converge;
    let listener = TcpListener::bind(resolve(addr)?)
        .with_context(|| format!("--accept-join: cannot listen on {addr}"))?;
    let joins = Joins::default();
    let j = Arc::clone(&joins);
    let acceptor = JoinAcceptor::spawn(
        listener,
        ft.clone(),
        (TransferHandle::of(vm), vm.control()),
        opts,
        Box::new(move |e| print_event(&j, e)),
    )
    .context("--accept-join")?;
    eprintln!(
        "accepting joins on {} whenever this side runs alone as a primary",
        acceptor.local_addr()
    );
    Ok(Some((acceptor, joins)))
}

/// The report's `joins` array.
pub fn joins_json(joins: Option<&Joins>) -> serde_json::Value {
    let Some(j) = joins else {
        return serde_json::Value::Null;
    };
    let j = j.lock().unwrap_or_else(|e| e.into_inner());
    serde_json::Value::Array(
        j.iter()
            .map(|s| {
                serde_json::json!({
                    "generation": s.generation,
                    "rounds": s.rounds,
                    "mbytes": mb(s.bytes),
                    "pause_ms": ms(s.pause),
                    "duration_s": s.duration.as_secs_f64(),
                    "final_pages": s.final_pages,
                    "cut_exit": s.cut_exit,
                    "cut_seq": s.cut_seq,
                    "min_share": s.min_share,
                })
            })
            .collect(),
    )
}

/// `ftvm backup --join`: clones the VM from the primary, pairs over the join connection in the
/// new generation, then replays as any backup (`pair::replay`).
///
/// # Errors
/// As `ftvm backup`; a refused or failed join.
pub fn backup(bc: BackupConfig, lifecycle: &mut Lifecycle) -> anyhow::Result<()> {
    let s = &bc.common;
    let peer = bc.join.as_deref().context("--join")?;
    let link = link(s, JoinSide::Joiner)?;
    let mut failover = s.failover(Role::Backup).context("--join needs --arbiter")?;
    // The generation comes from the primary (checked on the arbiter below), not from
    // --generation: no stale-generation check at the start.
    let arbiter: Arc<dyn Arbiter> = Arc::from(
        ftvm_ft::arbiter::open(&failover.arbiter.to_string())
            .with_context(|| format!("--arbiter {}", failover.arbiter))?,
    );
    let primary = resolve(peer)?;
    let (console, buf) = buffer_console();
    let backends = VmConfig {
        disk: s.disk.clone(),
        tap: None,
        net_without_backend: s.net.is_some(),
        console,
        ..VmConfig::default()
    };
    let req = JoinRequest {
        version: JOIN_VERSION,
        node: failover.node.clone(),
        heartbeat: failover.heartbeat,
        verify_cut: bc.verify_cut,
    };
    eprintln!("backup: joining the primary at {primary}");
    // A side that just went live becomes a primary a moment later, and one with a backup
    // may lose it: refused as "not alone", the join is tried again for a while.
    let deadline = std::time::Instant::now() + JOIN_PATIENCE;
    let joined = loop {
        let r = join(primary, &req, (&backends, &link), |r| {
            eprintln!(
                "backup: join: {:.1} MB of memory, {:.1} MB of disk received",
                mb(r.pages * 4096),
                mb(r.disk_bytes)
            );
        });
        match r {
            Err(JoinError::Refused {
                reason: RefuseReason::NotAlone,
                text,
            }) if std::time::Instant::now() < deadline => {
                eprintln!("backup: join refused ({text}); trying again");
                std::thread::sleep(Duration::from_millis(200));
            }
            r => break r.with_context(|| format!("cannot join the primary at {primary}"))?,
        }
    };
    let a = &joined.accept;
    eprintln!(
        "backup: joined the primary {} at {primary} as generation {}: {:.1} MB of memory, {:.1} MB of disk in {:.2} s, replaying from exit {} (log record {}){}",
        a.node,
        a.generation,
        mb(joined.received.0 * 4096),
        mb(joined.received.1),
        joined.elapsed.as_secs_f64(),
        joined.cut.exit,
        joined.cut.seq,
        match joined.cut.memory {
            Some(d) => format!("; memory digest at the cut {d:016x}, equal to the primary's"),
            None => String::new(),
        }
    );
    // The primary must hold the generation it gave this join (a primary of an older
    // generation, superseded meanwhile, cannot pair a backup).
    match arbiter.current().context("arbiter")? {
        Some((g, holder)) if g == a.generation && holder.to_string() == a.node => {}
        other => anyhow::bail!(
            "the primary {} offered generation {}, but the arbiter names {:?}: refusing to pair",
            a.node,
            a.generation,
            other.map(|(g, h)| (g, h.to_string()))
        ),
    }
    failover.generation = a.generation;
    failover.peer_heartbeat = a.heartbeat;
    failover.fail_timeout = Duration::from_millis(a.fail_timeout_ms);
    let vm = joined.vm;
    if s.shared_disk {
        vm.disk()
            .context("--shared-disk: the VM has no disk")?
            .set_shared(true);
    }
    let capacity = usize::try_from(a.log_capacity.max(s.log_capacity.0))
        .context("log capacity")?
        .next_power_of_two();
    let (mut p, c) = ftvm_ringbuf::with_capacity(capacity).context("log buffer")?;
    p.set_next_seq(joined.cut.seq)
        .context("log buffer: the cut's record")?;
    let cfg = Config {
        generation: a.generation,
        digest: a.digest,
        start_seq: joined.cut.seq,
        ..Config::default()
    };
    let t = joined.transport;
    let poller = PollerConfig {
        core: None,
        idle: s.poll_idle.into(),
    };
    let rx = LogReceiver::start(p, c, t, cfg.clone(), poller)
        .context("cannot pair with the primary after the join")?;
    let paired = format!(
        "backup: joined the primary {} as generation {}, replaying from exit {}",
        a.node, a.generation, joined.cut.exit
    );
    crate::pair::replay(
        &bc,
        (Some(failover), Some(arbiter)),
        (vm, cfg),
        rx,
        buf,
        &paired,
        lifecycle,
    )
}
