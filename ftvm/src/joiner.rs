//! `ftvm backup --join HOST:PORT`: a new backup that joins a primary running alone. Its VM is
//! cloned from the running primary (no guest image of its own: [`ftvm_ft::join::join`]); it
//! then pairs over the join connection (or a link of its own: [`crate::join`]) in the new
//! generation and replays as any backup ([`crate::pair`]). `ftvm backup` without `--join` is
//! [`crate::pair::backup`]; the command line picks one or the other.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ftvm_channel::{Config, LogReceiver, PollerConfig};
use ftvm_ft::join::{join, JoinError, JoinRequest, RefuseReason, JOIN_VERSION};
use ftvm_ft::{Arbiter, Role};
use ftvm_vmm_core::vm::{buffer_console, VmConfig};

use crate::config::BackupConfig;
use crate::join::{link, mb, resolve, JoinSide};
use crate::lifecycle::Lifecycle;

/// How long a joiner refused as "not alone" tries again.
const JOIN_PATIENCE: Duration = Duration::from_secs(10);

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
