//! Re-protection from the command line: `ftvm primary --accept-join HOST:PORT` (or `ftvm
//! backup --accept-join`, once it went live) accepts a new backup whenever it runs alone: this
//! module, used by [`crate::pair`]; `ftvm backup --join HOST:PORT` is that backup (no guest
//! image: its VM is cloned from the running primary): [`crate::joiner`], which then replays as
//! any backup ([`crate::pair`]). The logging links of a joined pair are here, for both ends.
//! The protocol and its safety argument are in [`ftvm_ft::join`].
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
use ftvm_channel::{Config, Transport as ChannelTransport, TransportError};
use ftvm_ft::golive::FtConfig;
use ftvm_ft::join::{
    JoinAcceptor, JoinEvent, JoinLink, JoinOptions, JoinPoint, JoinSummary, OwnLink,
};
use ftvm_vmm_core::transfer::TransferHandle;
use ftvm_vmm_core::vm::Vm;

use crate::config::{CommonConfig, Transport};

/// The joins a primary completed (for its report).
pub type Joins = Arc<Mutex<Vec<JoinSummary>>>;

/// The address `addr` names (its first).
pub(crate) fn resolve(addr: &str) -> anyhow::Result<SocketAddr> {
    addr.to_socket_addrs()
        .with_context(|| format!("bad address {addr}"))?
        .next()
        .with_context(|| format!("no address for {addr}"))
}

/// Which end of a join this process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum JoinSide {
    /// The side that accepts joins (`--accept-join`).
    Primary,
    /// `ftvm backup --join`.
    Joiner,
}

/// The logging channel of a joined pair on `side`: over the join connection (tcp,
/// tcp-spin, uring) or a link of its own (shm, xdp: [`OwnLink`] below).
pub(crate) fn link(s: &CommonConfig, side: JoinSide) -> anyhow::Result<JoinLink> {
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
            JoinSide::Joiner => Box::new(ShmTransport::create(
                &prefix,
                crate::transport::SHM_CAPACITY,
            )?),
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
        crate::transport::open_xdp(&self.interface)
    }
}

/// The join point to put in a side's failover settings, if it accepts joins.
pub fn join_point(s: &CommonConfig) -> Option<JoinPoint> {
    let capacity = usize::try_from(s.log_capacity.0).ok()?;
    s.accept_join.as_ref().map(|_| JoinPoint::new(capacity))
}

/// Bytes in MB (10^6), for the progress lines.
pub(crate) fn mb(b: u64) -> f64 {
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
/// a lone primary), with failover settings `ft`, the [`join_point`] `point` its run is given,
/// and the logging channel's parameters `channel`. `None` without `--accept-join`.
///
/// # Errors
/// The address cannot be bound, no arbiter, no join point, shm/xdp without `--peer`.
pub fn accept(
    s: &CommonConfig,
    (ft, point): (Option<&FtConfig>, Option<&JoinPoint>),
    vm: &Vm,
    channel: Config,
) -> anyhow::Result<Option<(JoinAcceptor, Joins)>> {
    let Some(addr) = s.accept_join.as_deref() else {
        return Ok(None);
    };
    let ft = ft.context("--accept-join needs --arbiter")?;
    let point = point.context("--accept-join: no join point (log capacity too large?)")?;
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
        (ft.clone(), point.clone()),
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
