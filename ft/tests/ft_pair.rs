//! Primary and backup over the real log channel (TCP on loopback), in one process: replay
//! equality, the output rule with stalled acknowledgements (console, and network transmits of
//! `kv` on a TAP in a network namespace), and divergence detection.

use ftvm_testkit::kv as common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ftvm_channel::{Config, Refusal, TransportError};
use ftvm_ft::backup::{run_backup, BackupReport, LogReader, Tamper};
use ftvm_ft::error::PairError;
use ftvm_ft::log::Entry;
use ftvm_ft::primary::{LogWriter, PairOptions, PrimaryHooks, PrimaryReport};
use ftvm_ft::run::run_primary;
use ftvm_testkit::link::TcpLink;
use ftvm_testkit::require_kvm;
use ftvm_vmm_core::digest::pairing_digest;
use ftvm_vmm_core::guests;
use ftvm_vmm_core::vm::{buffer_console, Vm, VmConfig};

#[derive(Default)]
struct Setup {
    cmdline: String,
    opts: PairOptions,
    hooks: PrimaryHooks,
    tamper: Option<Tamper>,
    stall: Option<Arc<AtomicBool>>,
    backup_cmdline: Option<String>,
    /// Push a control every few milliseconds while the primary runs.
    push_controls: bool,
}

struct Outcome {
    primary: Result<PrimaryReport, PairError>,
    backup: Result<BackupReport, PairError>,
    released: Arc<Mutex<Vec<u8>>>,
    backup_console: Vec<u8>,
}

fn config(cmdline: &str) -> (VmConfig, Arc<Mutex<Vec<u8>>>) {
    let (console, buf) = buffer_console();
    (
        VmConfig {
            mem_size: 16 << 20,
            cmdline: cmdline.into(),
            console,
            ..Default::default()
        },
        buf,
    )
}

fn channel_config(cmdline: &str) -> Config {
    let elf = guests::by_name("cpu").expect("cpu guest");
    Config {
        digest: pairing_digest(elf, cmdline, 16 << 20, None).expect("digest"),
        ..Config::default()
    }
}

fn run_pair(setup: Setup) -> Outcome {
    let elf = guests::by_name("cpu").expect("cpu guest");
    let (backup_end, primary_end) = TcpLink::new().connect().expect("link");
    let backup_cmdline = setup
        .backup_cmdline
        .clone()
        .unwrap_or_else(|| setup.cmdline.clone());
    let tamper = setup.tamper;
    let backup = std::thread::spawn(move || -> (Result<BackupReport, PairError>, Vec<u8>) {
        let (cfg, buf) = config(&backup_cmdline);
        let mut vm = Vm::new(&cfg, elf).expect("backup vm");
        let rx = match backup_end.start(channel_config(&backup_cmdline)) {
            Ok(rx) => rx,
            Err(e) => return (Err(PairError::Channel(e)), Vec::new()),
        };
        let reader = LogReader::new(rx, Default::default(), tamper);
        let handled = Arc::new(Mutex::new(Vec::new()));
        let h2 = handled.clone();
        reader
            .controls()
            .on_apply(move |c| h2.lock().unwrap().push(c));
        let r = run_backup(&mut vm, reader);
        if let Ok(rep) = &r {
            assert_eq!(
                *handled.lock().unwrap(),
                rep.controls,
                "handler saw every control"
            );
        }
        let out = buf.lock().unwrap().clone();
        (r, out)
    });
    let (cfg, buf) = config(&setup.cmdline);
    let mut vm = Vm::new(&cfg, elf).expect("primary vm");
    let stall = setup.stall.clone().unwrap_or_default();
    let released = Arc::new(Mutex::new(Vec::new()));
    let primary = match primary_end
        .stall_acks(stall.clone())
        .start(channel_config(&setup.cmdline))
    {
        Ok(sender) => {
            if setup.stall.is_some() {
                stall.store(true, Ordering::Release);
            }
            let writer = LogWriter::new(sender, Default::default());
            let r2 = released.clone();
            let done = Arc::new(AtomicBool::new(false));
            let pusher = setup.push_controls.then(|| {
                let (q, done) = (writer.controls().clone(), done.clone());
                // Two before the start (logged at the first checkpoint), more while it runs.
                q.push(1, 1000);
                q.push(2, 2000);
                std::thread::spawn(move || {
                    let mut n = 2u64;
                    while !done.load(Ordering::Acquire) {
                        n += 1;
                        q.push((n % 3) as u32, n * 1000);
                        std::thread::sleep(Duration::from_millis(1));
                    }
                })
            });
            let r = run_primary(
                &mut vm,
                &writer,
                &setup.opts,
                Some((
                    buf,
                    Box::new(move |d: &[u8]| r2.lock().unwrap().extend_from_slice(d)),
                )),
                &setup.hooks,
            );
            done.store(true, Ordering::Release);
            if let Some(p) = pusher {
                p.join().expect("pusher");
            }
            r
        }
        Err(e) => Err(PairError::Channel(e)),
    };
    let (backup, backup_console) = backup.join().expect("backup thread");
    Outcome {
        primary,
        backup,
        released,
        backup_console,
    }
}

const TIMING: &str = "size=256k rounds=4 seed=3 timing";

fn opts(interval: u64, mem_every: u64) -> PairOptions {
    PairOptions {
        digest_interval: interval,
        mem_digest_every: mem_every,
        ack_timeout: Duration::from_secs(10),
        ..Default::default()
    }
}

#[test]
fn ft_backup_replays_the_primary_exactly() {
    require_kvm!("ft_backup_replays_the_primary_exactly");
    let o = run_pair(Setup {
        cmdline: TIMING.into(),
        opts: opts(3, 1),
        ..Default::default()
    });
    let p = o.primary.expect("primary");
    let b = o.backup.expect("backup");
    assert_eq!(p.code, 0);
    assert_eq!((b.code, b.exits), (p.code, p.exits));
    assert_eq!(b.mem_digest, p.mem_digest);
    assert_eq!(b.regs_digest, p.regs_digest);
    assert!(b.checkpoints >= 2, "{b:?}");
    assert!(p.backup_finished);
    let released = o.released.lock().unwrap().clone();
    let text = String::from_utf8_lossy(&released);
    assert!(text.contains("cpu: elapsed_ns="), "{text}");
    assert_eq!(released, o.backup_console, "console output differs");
    // Every console line was verified against the primary's output digest.
    let lines = released.iter().filter(|&&b| b == b'\n').count() as u64;
    assert!(lines >= 3, "{text}");
    assert_eq!(b.outputs_verified, lines, "one digest per console write");
    assert_eq!(b.output_bytes_verified, released.len() as u64);
    // The clock reads went through the log: entries beyond header, digests and end.
    assert!(p.entries > 2 + b.checkpoints, "{p:?}");
    assert_eq!(p.outputs.early, 0);
    assert!(p.outputs.releases.iter().all(|(tag, acked)| acked >= tag));
}

#[test]
fn ft_controls_apply_at_the_same_exit_on_both_sides() {
    require_kvm!("ft_controls_apply_at_the_same_exit_on_both_sides");
    let o = run_pair(Setup {
        cmdline: "size=1M rounds=16 seed=5 timing".into(),
        opts: opts(3, 0),
        push_controls: true,
        ..Default::default()
    });
    let p = o.primary.expect("primary");
    let b = o.backup.expect("backup");
    assert_eq!(b.mem_digest, p.mem_digest);
    assert!(p.controls.len() >= 2, "{:?}", p.controls);
    assert_eq!(p.controls, b.controls);
    assert!(p
        .controls
        .iter()
        .all(|c| c.exit % 3 == 0 && c.value % 1000 == 0));
    let mut sorted = p.controls.clone();
    sorted.sort_by_key(|c| c.value);
    assert_eq!(sorted, p.controls, "applied in the order pushed");
    // The stall counters are consistent (a 1 MiB buffer rarely fills here).
    assert_eq!(p.log_stalls.count == 0, p.log_stalls.time.is_zero());
}

#[test]
fn ft_outputs_wait_for_stalled_acks() {
    require_kvm!("ft_outputs_wait_for_stalled_acks");
    let stall = Arc::new(AtomicBool::new(false));
    let s2 = stall.clone();
    let unstaller = std::thread::spawn(move || {
        // Wait until the stall is armed, then hold it for 400 ms.
        let t = Instant::now();
        while !s2.load(Ordering::Acquire) && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(400));
        s2.store(false, Ordering::Release);
    });
    let o = run_pair(Setup {
        cmdline: TIMING.into(),
        opts: opts(1000, 0),
        stall: Some(stall),
        ..Default::default()
    });
    unstaller.join().unwrap();
    let p = o.primary.expect("primary");
    o.backup.expect("backup");
    assert!(p.outputs.released >= 1);
    assert_eq!(p.outputs.early, 0);
    // Nothing could be released while the acks were withheld.
    assert!(
        p.outputs.delay_us.max() >= 300_000,
        "max delay {} µs",
        p.outputs.delay_us.max()
    );
}

/// The timing guest's pair with `opts`, the log changed on its way by `tamper`.
fn run_tampered(opts: PairOptions, tamper: Tamper) -> Outcome {
    run_pair(Setup {
        cmdline: TIMING.into(),
        opts,
        tamper: Some(tamper),
        ..Default::default()
    })
}

fn expect_divergence(r: Result<BackupReport, PairError>) -> String {
    match r {
        Err(e @ PairError::Diverged { .. }) => {
            let text = e.to_string();
            assert!(text.starts_with("diverged at exit "), "{text}");
            text
        }
        other => panic!("expected a divergence, got {other:?}"),
    }
}

#[test]
fn ft_corrupted_entry_is_a_divergence() {
    require_kvm!("ft_corrupted_entry_is_a_divergence");
    // A read value changed on the way: the guest computes with it; caught by digests.
    let tamper: Tamper = Box::new(|_, e| {
        if let Entry::Read { value, .. } = e {
            *value = value.wrapping_add(12_345_678_901);
        }
    });
    let text = expect_divergence(run_tampered(opts(2, 1), tamper).backup);
    assert!(text.contains("digest"), "{text}");
    // A read logged at another address: caught at that exit.
    let tamper: Tamper = Box::new(|_, e| {
        if let Entry::Read { addr, .. } = e {
            *addr += 8;
        }
    });
    let text = expect_divergence(run_tampered(opts(2, 1), tamper).backup);
    assert!(text.contains("but the primary read"), "{text}");
}

/// An output digest entry corrupted on the way (one bit of the second console line's hash):
/// the backup's own console output no longer matches, and it stops at that exit with
/// `diverged at exit N: output …`, although registers and memory are equal.
#[test]
fn ft_corrupted_output_digest_is_a_divergence() {
    require_kvm!("ft_corrupted_output_digest_is_a_divergence");
    let mut outputs = 0;
    let tamper: Tamper = Box::new(move |_, e| {
        if let Entry::Output { digest, .. } = e {
            outputs += 1;
            if outputs == 2 {
                digest.hash ^= 1 << 17;
            }
        }
    });
    let o = run_tampered(opts(1000, 0), tamper);
    // (Without failover the primary then fails too: its backup closed the link.)
    let text = expect_divergence(o.backup);
    assert!(text.contains(": output of the console differs"), "{text}");
    // The first line was verified and printed; the second differed and was never printed.
    let lines = o.backup_console.iter().filter(|&&b| b == b'\n').count();
    assert_eq!(lines, 1, "{}", String::from_utf8_lossy(&o.backup_console));
}

#[test]
fn ft_nondeterministic_primary_is_a_divergence() {
    require_kvm!("ft_nondeterministic_primary_is_a_divergence");
    // Host data handed to the guest without logging it (at checkpoint 1).
    let o = run_pair(Setup {
        cmdline: TIMING.into(),
        opts: opts(2, 1),
        hooks: PrimaryHooks {
            unlogged_write: Some((1, 0x3f_0000, vec![0xa5; 64])),
        },
        ..Default::default()
    });
    let text = expect_divergence(o.backup);
    assert!(text.contains("memory digest"), "{text}");
}

#[test]
fn ft_different_initial_state_refuses_to_pair() {
    require_kvm!("ft_different_initial_state_refuses_to_pair");
    let o = run_pair(Setup {
        cmdline: TIMING.into(),
        backup_cmdline: Some("size=256k rounds=4 seed=4 timing".into()),
        ..Default::default()
    });
    // Both sides refuse at the handshake, for the digest, with the same typed reason (the
    // backup by its own check, the primary from the backup's REFUSE frame).
    for (side, r) in [
        ("primary", o.primary.map(|_| ())),
        ("backup", o.backup.map(|_| ())),
    ] {
        match r {
            Err(PairError::Channel(TransportError::Refused {
                reason: Refusal::Digest,
                text,
            })) if text.contains("pairing digest mismatch") => {}
            other => panic!("{side}: expected a pairing digest mismatch, got {other:?}"),
        }
    }
}

#[test]
fn ft_kv_transmits_wait_for_stalled_acks() {
    const TEST: &str = "ft_kv_transmits_wait_for_stalled_acks";
    if ftvm_testkit::skip::if_missing(TEST, common::net_missing()) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (pdisk, bdisk) = common::blank_disks(dir.path());
    let ns = common::namespace("ftnet");
    let cmdline = format!("ip={}/24 gw=10.0.2.1 port=6379", common::GUEST_IP);
    let elf = guests::by_name("kv").expect("kv guest");
    let chan = |disk: &std::path::Path| Config {
        digest: pairing_digest(elf, &cmdline, 64 << 20, Some(disk)).expect("digest"),
        ..Config::default()
    };
    let (pcfg, bcfg) = (chan(&pdisk), chan(&bdisk));
    let stall = Arc::new(AtomicBool::new(false));
    // Connected from the host's namespace (loopback is per namespace), used inside `ns`.
    let (backup_end, primary_end) = TcpLink::new().ring(1 << 22).connect().expect("link");
    let primary_end = primary_end.stall_acks(stall.clone());
    let bcmd = cmdline.clone();
    let backup = std::thread::spawn(move || -> Result<BackupReport, PairError> {
        let (cfg, _buf) = common::backup_vm_config(64 << 20, bcmd, bdisk);
        let mut vm = Vm::new(&cfg, elf).expect("backup vm");
        let rx = backup_end.start(bcfg)?;
        run_backup(&mut vm, LogReader::new(rx, Default::default(), None))
    });
    let (cfg, pbuf) = common::primary_vm_config(64 << 20, cmdline, pdisk);
    let pconsole = pbuf.clone();
    let (net_tx, net_rx) = std::sync::mpsc::channel();
    let primary = ns
        .spawn("ft-primary", move || {
            let mut vm = Vm::new(&cfg, elf).expect("primary vm");
            net_tx.send(vm.net().cloned()).expect("net handle");
            let sender = primary_end.start(pcfg)?;
            let writer = LogWriter::new(sender, Default::default());
            let opts = PairOptions {
                ack_timeout: Duration::from_secs(10),
                ..Default::default()
            };
            let r = run_primary(&mut vm, &writer, &opts, None, &PrimaryHooks::default());
            let tx = vm.net().expect("net device").tx_counters();
            Ok::<_, PairError>((r, tx))
        })
        .expect("spawn primary");
    let net = net_rx.recv().expect("net handle").expect("net device");
    common::wait_ready_with(&ns, &pconsole);
    // Withhold the acks: the reply to PING (any frame of it: SYN-ACK, data) must wait.
    stall.store(true, Ordering::Release);
    let (stalled_at, gated0) = (Instant::now(), net.tx_counters().gated);
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let ns_name = ns.name().to_string();
    let client = std::thread::spawn(move || {
        let ns = ftvm_channel::netns::Netns::open(&ns_name).expect("open netns");
        let t0 = Instant::now();
        let out = common::redis(&ns, &["PING"]);
        let _ = done_tx.send(());
        (
            t0.elapsed(),
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
        )
    });
    // The guest answered (a frame went to the output gate), and the client has nothing...
    while net.tx_counters().gated == gated0 {
        assert!(
            stalled_at.elapsed() < Duration::from_secs(10),
            "the guest never answered the client"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let answered = Instant::now();
    // ...nor after the acks were held 700 ms more.
    for _ in 0..2 {
        assert!(
            done_rx.try_recv().is_err(),
            "the guest's reply reached the client while the acks were withheld"
        );
        std::thread::sleep(Duration::from_millis(700).saturating_sub(answered.elapsed()));
    }
    eprintln!(
        "ft_kv_transmits_wait_for_stalled_acks: the guest answered {:?} into the stall",
        answered - stalled_at
    );
    stall.store(false, Ordering::Release);
    let (elapsed, reply) = client.join().expect("client");
    assert_eq!(reply, "PONG");
    assert!(elapsed >= Duration::from_millis(650), "{elapsed:?}");
    assert_eq!(common::redis_reply(&ns, &["SET", "k", "v"]), "OK");
    assert_eq!(common::redis_reply(&ns, &["GET", "k"]), "v");
    common::redis_shutdown(&ns);
    let (p, tx) = primary
        .join()
        .expect("primary thread")
        .expect("netns")
        .expect("primary setup");
    let p = p.expect("primary");
    let b = backup.join().expect("backup thread").expect("backup");
    assert_eq!((b.code, b.mem_digest), (p.code, p.mem_digest));
    assert!(tx.gated >= 4 && tx.direct == 0, "{tx:?}");
    assert!(p.outputs.released >= tx.gated, "{:?}", p.outputs.released);
    assert_eq!(p.outputs.early, 0);
    assert!(p.outputs.releases.iter().all(|(tag, acked)| acked >= tag));
    assert!(
        p.outputs.delay_us.max() >= 600_000,
        "max delay {} µs",
        p.outputs.delay_us.max()
    );
}
