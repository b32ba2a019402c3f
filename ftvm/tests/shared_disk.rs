//! Shared-disk mode: the primary and the backup of a pair name the same disk image (real KVM,
//! the `kv` guest on a TAP in a network namespace, TCP on loopback, one process).
//!
//! - a pair running `kv` under client commands: the backup never touches the disk (it drops
//!   exactly the writes the primary performed), the disk ends byte for byte equal to the disk of
//!   a run without FT given the same commands, and `kv` restarted on it recovers every key;
//! - with the backup's acknowledgements withheld, a guest write does not reach the disk file
//!   until they resume;
//! - the primary crashes mid-run: the backup goes live on the same disk, keeps every
//!   acknowledged write, and `kv` restarted on the disk afterwards finds them all;
//! - the backup's log ends inside a disk exit (after the read data, before the status): going
//!   live completes the request on the disk (else `kv` would see an I/O error and stop);
//! - `ftvm primary/backup --shared-disk` as real processes: `kv` under `redis-benchmark`, and a
//!   mode mismatch refused at pairing (the `ftvm` binary comes from this test's target
//!   directory; SKIP when it is not built).

use ftvm_testkit::kv as common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ftvm_channel::netns::{Netns, NetnsError};
use ftvm_channel::Config;
use ftvm_ft::arbiter::{Arbiter, FileArbiter};
use ftvm_ft::backup::{run_backup, BackupReport, LogReader};
use ftvm_ft::error::PairError;
use ftvm_ft::golive::BackupFtReport;
use ftvm_ft::primary::{LogWriter, PairOptions, PrimaryHooks, PrimaryReport};
use ftvm_ft::run::{run_backup_ft, run_primary, run_primary_ft, PrimaryFtReport};
use ftvm_testkit::link::TcpLink;
use ftvm_vmm_core::devices::virtio::blk::{BlkCounters, BlkHandle, DiskMode};
use ftvm_vmm_core::devices::virtio::owner::DiskOwner;
use ftvm_vmm_core::digest::pairing_digest;
use ftvm_vmm_core::error_chain;
use ftvm_vmm_core::guests;
use ftvm_vmm_core::memory::GuestMem;
use ftvm_vmm_core::record::memlog::{Event, MemRecorder, MemReplay};
use ftvm_vmm_core::record::{Inputs, ReplayError, ReplaySource};
use ftvm_vmm_core::vm::{RunOutcome, Vm, VmConfig, VmControl};

use common::{free_port, ftvm_binary, report};

/// How every test here with a network starts: a SKIP line without KVM or root; else a
/// temporary directory, a blank shared image in it and a namespace (`tag`) with the TAP.
fn shared_setup(test: &str, tag: &str) -> Option<(tempfile::TempDir, PathBuf, Netns)> {
    if ftvm_testkit::skip::if_missing(test, common::net_missing()) {
        return None;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = common::blank_disk(dir.path(), "shared.img");
    let ns = common::namespace(tag);
    Some((dir, disk, ns))
}

const MEM: u64 = 64 << 20;

fn kv_cmdline() -> String {
    format!("ip={}/24 gw=10.0.2.1 port=6379", common::GUEST_IP)
}

/// The channel config of both sides: one image, one digest.
fn chan(disk: &Path) -> Config {
    let elf = guests::by_name("kv").expect("kv guest");
    let cmdline = format!("{}\0shared_disk", kv_cmdline());
    Config {
        digest: pairing_digest(elf, &cmdline, MEM, Some(disk)).expect("digest"),
        ..Config::default()
    }
}

fn backup_config(disk: &Path) -> (VmConfig, Arc<Mutex<Vec<u8>>>) {
    common::backup_vm_config(MEM, kv_cmdline(), disk.to_path_buf())
}

fn primary_config(disk: &Path) -> (VmConfig, Arc<Mutex<Vec<u8>>>) {
    common::primary_vm_config(MEM, kv_cmdline(), disk.to_path_buf())
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// One RESP line (without CR LF) from `s`.
fn read_line(s: &mut TcpStream) -> String {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while !line.ends_with(b"\r\n") {
        match s.read(&mut b) {
            Ok(1) => line.push(b[0]),
            other => panic!("kv connection: {other:?} after {line:?}"),
        }
    }
    String::from_utf8_lossy(&line[..line.len() - 2]).into_owned()
}

/// The generation in the shared image's owner record (`<image>.owner`).
fn owner_generation(disk: &Path) -> u64 {
    DiskOwner::open(disk)
        .and_then(|o| o.generation())
        .expect("owner record")
}

fn disk_has(disk: &Path, needle: &str) -> bool {
    contains(&std::fs::read(disk).expect("read disk"), needle.as_bytes())
}

/// Boots `kv` alone on `disk` and checks that every `(key, value)` is there.
fn recovers(ns: &Netns, disk: &Path, keys: &[(&str, &str)]) {
    let vm = common::start_kv(ns, disk, "");
    common::wait_ready(ns, &vm);
    for (k, v) in keys {
        assert_eq!(
            common::redis_reply(ns, &["GET", k]),
            *v,
            "key {k} after a restart on the shared disk; console: {}",
            vm.console_text()
        );
    }
    common::redis_shutdown(ns);
    assert_eq!(vm.join().expect("kv restarted"), RunOutcome::PoweredOff(0));
}

struct PairResult {
    primary: PrimaryReport,
    primary_disk: BlkCounters,
    backup: BackupReport,
}

/// A shared-disk pair of `kv` on `disk` (plain, no failover) while `drive` talks to it; the
/// primary's transport withholds acknowledgements while `stall` is set. `drive` must end with
/// SHUTDOWN.
fn kv_pair(
    ns: &Netns,
    disk: &Path,
    stall: Arc<AtomicBool>,
    drive: impl FnOnce(&Arc<Mutex<Vec<u8>>>),
) -> PairResult {
    // Connected from the host's namespace (loopback is per namespace), used inside `ns`.
    let (backup_end, primary_end) = TcpLink::new().ring(1 << 22).connect().expect("link");
    let primary_end = primary_end.stall_acks(stall);
    let elf = guests::by_name("kv").expect("kv guest");
    let bdisk = disk.to_path_buf();
    let backup = std::thread::spawn(move || -> Result<BackupReport, PairError> {
        let (cfg, _buf) = backup_config(&bdisk);
        let mut vm = Vm::new(&cfg, elf).expect("backup vm");
        vm.disk().expect("disk").set_shared(true);
        let rx = backup_end.start(chan(&bdisk))?;
        run_backup(&mut vm, LogReader::new(rx, Default::default(), None))
    });
    let (cfg, pbuf) = primary_config(disk);
    let pconsole = pbuf.clone();
    let pdisk = disk.to_path_buf();
    let primary = ns
        .spawn("sd-primary", move || {
            let mut vm = Vm::new(&cfg, elf).expect("primary vm");
            vm.disk().expect("disk").set_shared(true);
            let sender = primary_end.start(chan(&pdisk))?;
            let writer = LogWriter::new(sender, Default::default());
            let opts = PairOptions {
                ack_timeout: Duration::from_secs(10),
                ..Default::default()
            };
            let r = run_primary(&mut vm, &writer, &opts, None, &PrimaryHooks::default());
            let counters = vm.disk().expect("disk").counters();
            Ok::<_, PairError>((r, counters))
        })
        .expect("spawn primary");
    drive(&pconsole);
    let (p, primary_disk) = primary
        .join()
        .expect("primary thread")
        .expect("netns")
        .expect("primary setup");
    let primary = p.unwrap_or_else(|e| panic!("primary: {}", error_chain(&e)));
    let backup = backup
        .join()
        .expect("backup thread")
        .unwrap_or_else(|e| panic!("backup: {}", error_chain(&e)));
    PairResult {
        primary,
        primary_disk,
        backup,
    }
}

#[test]
fn shared_disk_kv_pair_equals_a_plain_run_and_the_backup_never_writes() {
    const TEST: &str = "shared_disk_kv_pair_equals_a_plain_run_and_the_backup_never_writes";
    let _one = ftvm_testkit::one_at_a_time();
    let Some((dir, disk, ns)) = shared_setup(TEST, "sdpair") else {
        return;
    };
    let keys: Vec<(String, String)> = (0..8)
        .map(|i| (format!("key{i}"), format!("value-{i}-shared")))
        .collect();
    let commands = |ns: &Netns| {
        for (k, v) in &keys {
            assert_eq!(common::redis_reply(ns, &["SET", k, v]), "OK");
        }
        for i in 1..=3 {
            assert_eq!(common::redis_reply(ns, &["INCR", "n"]), i.to_string());
        }
        assert_eq!(common::redis_reply(ns, &["DEL", "key7"]), "1");
        common::redis_shutdown(ns);
    };
    let r = kv_pair(&ns, &disk, Arc::default(), |console| {
        common::wait_ready_with(&ns, console);
        commands(&ns);
    });
    // The same commands on a plain kv without FT, on a disk of its own.
    let plain = common::blank_disk(dir.path(), "plain.img");
    let vm = common::start_kv(&ns, &plain, "");
    common::wait_ready(&ns, &vm);
    commands(&ns);
    assert_eq!(vm.join().expect("plain kv"), RunOutcome::PoweredOff(0));
    assert!(
        std::fs::read(&plain).expect("plain disk") == std::fs::read(&disk).expect("shared disk"),
        "the shared disk differs from the disk of a run without FT"
    );
    let (p, b) = (&r.primary, &r.backup);
    eprintln!(
        "{TEST}: primary disk {:?}, waits {:?}; backup disk {:?}",
        r.primary_disk, p.disk_waits, b.disk
    );
    assert_eq!((b.code, b.mem_digest), (p.code, p.mem_digest));
    let waits = p.disk_waits.expect("shared-disk primary counts its waits");
    let bd = b.disk.expect("shared-disk backup counts its drops");
    // 12 commands that write, group-committed: at least one disk write each.
    assert!(r.primary_disk.writes >= 12, "{:?}", r.primary_disk);
    assert_eq!(r.primary_disk.gated, r.primary_disk.writes);
    assert_eq!(waits.writes, r.primary_disk.gated);
    assert_eq!(r.primary_disk.refused, 0);
    assert!(r.primary_disk.reads >= 1, "kv reads its log at boot");
    // The backup replayed every request without touching the disk: it dropped exactly the
    // writes the primary performed, and read nothing (read data came from the log).
    assert_eq!(bd.dropped, r.primary_disk.writes, "{bd:?}");
    assert_eq!((bd.reads, bd.writes, bd.redone), (0, 0, 0), "{bd:?}");
    // Each dropped write was verified against the primary's output digest of it (besides the
    // transmitted frames and console lines).
    assert!(
        b.outputs_verified > bd.dropped,
        "{} verified",
        b.outputs_verified
    );
    for (_, v) in &keys {
        assert!(disk_has(&disk, v), "{v} is not on the disk");
    }
    let mut expect: Vec<(&str, &str)> = keys[..7]
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    expect.push(("n", "3"));
    expect.push(("key7", ""));
    recovers(&ns, &disk, &expect);
}

#[test]
fn shared_disk_write_waits_for_stalled_acks() {
    const TEST: &str = "shared_disk_write_waits_for_stalled_acks";
    let _one = ftvm_testkit::one_at_a_time();
    let Some((_dir, disk, ns)) = shared_setup(TEST, "sdstall") else {
        return;
    };
    let stall = Arc::new(AtomicBool::new(false));
    let s2 = stall.clone();
    const VALUE: &str = "written-while-the-acks-were-withheld";
    let r = kv_pair(&ns, &disk, stall, |console| {
        common::wait_ready_with(&ns, console);
        assert_eq!(common::redis_reply(&ns, &["SET", "first", "one"]), "OK");
        // A client connected before the stall (the output rule would hold the handshake's
        // SYN-ACK): with the acks withheld, the guest still receives its SET (an input is
        // logged, not held) and appends it to its log on the disk — and that write must wait.
        let (ready_tx, ready_rx) = mpsc::channel();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let (done_tx, done_rx) = mpsc::channel();
        let client = ns
            .spawn("sd-client", move || {
                let mut s = TcpStream::connect((common::GUEST_IP, 6379)).expect("connect kv");
                s.set_read_timeout(Some(Duration::from_secs(20)))
                    .expect("timeout");
                s.write_all(b"*1\r\n$4\r\nPING\r\n").expect("send PING");
                assert_eq!(read_line(&mut s), "+PONG");
                ready_tx.send(()).expect("ready");
                go_rx.recv().expect("go");
                let t0 = Instant::now();
                let cmd = format!(
                    "*3\r\n$3\r\nSET\r\n$7\r\nstalled\r\n${}\r\n{VALUE}\r\n",
                    VALUE.len()
                );
                s.write_all(cmd.as_bytes()).expect("send SET");
                let reply = read_line(&mut s);
                let _ = done_tx.send(());
                (t0.elapsed(), reply)
            })
            .expect("spawn client");
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("client connected");
        s2.store(true, Ordering::Release);
        go_tx.send(()).expect("go");
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_millis(800) {
            assert!(
                !disk_has(&disk, VALUE),
                "the write reached the disk while the acks were withheld"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(
            done_rx.try_recv().is_err(),
            "the reply reached the client while the acks were withheld"
        );
        s2.store(false, Ordering::Release);
        let (elapsed, reply) = client.join().expect("client thread").expect("netns");
        assert_eq!(reply, "+OK");
        assert!(elapsed >= Duration::from_millis(750), "{elapsed:?}");
        assert!(
            disk_has(&disk, VALUE),
            "the write is on the disk once acked"
        );
        common::redis_shutdown(&ns);
    });
    let waits = r.primary.disk_waits.expect("waits counted");
    eprintln!("{TEST}: {waits:?}");
    assert!(waits.waited >= 1, "{waits:?}");
    assert!(waits.max >= Duration::from_millis(700), "{waits:?}");
    assert!(waits.time >= waits.max);
    assert_eq!(r.backup.mem_digest, r.primary.mem_digest);
    recovers(&ns, &disk, &[("first", "one"), ("stalled", VALUE)]);
}

type PrimaryEnd = (Result<PrimaryFtReport, PairError>, BlkCounters);

/// A fault-tolerant shared-disk pair of `kv` on `disk` (file arbiter in `adir`, detectors with a
/// 250 ms timeout); the backup takes over the TAP of `ns` when it goes live. Each side's thread
/// returning is a crash of that side (its VM, channel end and detector go).
struct FtPair {
    primary: std::thread::JoinHandle<Result<Result<PrimaryEnd, PairError>, NetnsError>>,
    backup: std::thread::JoinHandle<Result<Result<BackupFtReport, PairError>, NetnsError>>,
    primary_vm: VmControl,
    backup_vm: VmControl,
    arbiter: Arc<dyn Arbiter>,
}

fn ft_pair(ns: &Netns, disk: &Path, adir: &Path) -> FtPair {
    std::fs::create_dir(adir).expect("arbiter dir");
    let arbiter: Arc<dyn Arbiter> = Arc::new(FileArbiter::new(adir));
    let elf = guests::by_name("kv").expect("kv guest");
    let [pa, ba] = common::free_udp();
    let pft = common::ft_config(&arbiter, "primary", pa, ba);
    let mut bft = common::ft_config(&arbiter, "backup", ba, pa);
    bft.service_tap = Some(common::TAP.into());
    // Connected from the host's namespace (loopback is per namespace), used inside `ns`.
    let (backup_end, primary_end) = TcpLink::new().ring(1 << 22).connect().expect("link");
    let bdisk = disk.to_path_buf();
    let (btx, brx) = mpsc::channel();
    let backup = ns
        .spawn("sd-backup", move || {
            let (cfg, buf) = backup_config(&bdisk);
            let mut vm = Vm::new(&cfg, elf).expect("backup vm");
            vm.disk().expect("disk").set_shared(true);
            btx.send(vm.control()).expect("control");
            let rx = backup_end.start(chan(&bdisk))?;
            let reader = LogReader::new(rx, Default::default(), None);
            let sink: ftvm_ft::output::Sink = Box::new(|_| {});
            run_backup_ft(&mut vm, reader, (bft, None), Some((buf, sink)))
        })
        .expect("spawn backup");
    let (cfg, pbuf) = primary_config(disk);
    let pconsole = pbuf.clone();
    let (ptx, prx) = mpsc::channel();
    let pdisk = disk.to_path_buf();
    let primary = ns
        .spawn("sd-primary", move || {
            let mut vm = Vm::new(&cfg, elf).expect("primary vm");
            vm.disk().expect("disk").set_shared(true);
            ptx.send(vm.control()).expect("control");
            let sender = primary_end.start(chan(&pdisk))?;
            let writer = LogWriter::new(sender, Default::default());
            let opts = PairOptions {
                ack_timeout: Duration::from_secs(10),
                ..Default::default()
            };
            let ft = (pft, None);
            let r = run_primary_ft(&mut vm, &writer, &opts, None, &PrimaryHooks::default(), ft);
            Ok::<_, PairError>((r, vm.disk().expect("disk").counters()))
        })
        .expect("spawn primary");
    let primary_vm = prx.recv().expect("primary control");
    let backup_vm = brx.recv().expect("backup control");
    common::wait_ready_with(ns, &pconsole);
    FtPair {
        primary,
        backup,
        primary_vm,
        backup_vm,
        arbiter,
    }
}

#[test]
fn shared_disk_golive_keeps_every_acknowledged_write_after_the_primary_crashes() {
    const TEST: &str =
        "shared_disk_golive_keeps_every_acknowledged_write_after_the_primary_crashes";
    let _one = ftvm_testkit::one_at_a_time();
    let Some((dir, disk, ns)) = shared_setup(TEST, "sdlive") else {
        return;
    };
    let FtPair {
        primary,
        backup,
        primary_vm,
        arbiter,
        ..
    } = ft_pair(&ns, &disk, &dir.path().join("arbiter"));
    let acked: Vec<(String, String)> = (0..6)
        .map(|i| (format!("before{i}"), format!("acked-before-crash-{i}")))
        .collect();
    for (k, v) in &acked {
        assert_eq!(common::redis_reply(&ns, &["SET", k, v]), "OK");
    }
    for i in 1..=3 {
        assert_eq!(common::redis_reply(&ns, &["INCR", "n"]), i.to_string());
    }
    // Crash the primary while a client keeps writing (its unacknowledged writes may or may not
    // survive; every acknowledged one must).
    let ns_name = ns.name().to_string();
    let writer_stop = Arc::new(AtomicBool::new(false));
    let ws = writer_stop.clone();
    let during = std::thread::spawn(move || {
        let ns = Netns::open(&ns_name).expect("open netns");
        let mut ok = Vec::new();
        let mut i = 0;
        while !ws.load(Ordering::Acquire) && i < 200 {
            let (k, v) = (
                format!("during{i}"),
                format!("written-around-the-crash-{i}"),
            );
            let out = ns
                .exec(
                    "timeout",
                    &["2", "redis-cli", "-h", common::GUEST_IP, "SET", &k, &v],
                )
                .expect("redis-cli");
            if out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "OK" {
                ok.push((k, v));
            }
            i += 1;
        }
        ok
    });
    std::thread::sleep(Duration::from_millis(150));
    let crashed = Instant::now();
    primary_vm.kick();
    let (p, pcounters) = primary
        .join()
        .expect("primary thread")
        .expect("netns")
        .expect("primary setup");
    assert!(
        matches!(p, Err(PairError::Paused(_))),
        "the primary did not crash as planned: {:?}",
        p.as_ref().map(|r| r.alone).map_err(|e| error_chain(e))
    );
    let reply = common::get_after_crash(&ns, "before0", crashed, String::new);
    eprintln!(
        "{TEST}: first reply {:?} after the crash",
        crashed.elapsed()
    );
    assert_eq!(reply, "acked-before-crash-0");
    std::thread::sleep(Duration::from_millis(200));
    writer_stop.store(true, Ordering::Release);
    let during_ok = during.join().expect("writer thread");
    assert_eq!(common::redis_reply(&ns, &["INCR", "n"]), "4");
    assert_eq!(
        common::redis_reply(&ns, &["SET", "after", "failover"]),
        "OK"
    );
    for (k, v) in acked.iter().chain(&during_ok) {
        assert_eq!(
            common::redis_reply(&ns, &["GET", k]),
            *v,
            "live backup: {k}"
        );
    }
    common::redis_shutdown(&ns);
    let b = backup
        .join()
        .expect("backup thread")
        .expect("netns")
        .unwrap_or_else(|e| panic!("backup: {}", error_chain(&e)));
    let BackupFtReport::WentLive(live) = b else {
        panic!("the backup did not go live");
    };
    let bd = live.disk.expect("shared-disk counters");
    eprintln!(
        "{TEST}: primary disk {pcounters:?}; backup disk {bd:?}; {} writes acknowledged around the crash; go-live at exit {}",
        during_ok.len(),
        live.timings.at_exit
    );
    assert_eq!((live.code, live.timings.generation), (0, 2));
    assert_eq!(
        arbiter
            .current()
            .expect("arbiter")
            .map(|(g, w)| (g, w.to_string())),
        Some((2, "backup".to_string()))
    );
    // Storage fencing: the live backup took the disk's owner record for generation 2.
    assert_eq!(owner_generation(&disk), 2);
    assert!(pcounters.writes >= 9, "{pcounters:?}");
    // While replaying the backup dropped what the primary wrote (at most the primary's
    // writes); live, it wrote the rest itself.
    assert!(
        bd.dropped >= 9 && bd.dropped <= pcounters.writes,
        "{bd:?} vs {pcounters:?}"
    );
    assert!(bd.writes >= 2, "the live backup wrote INCR and SET: {bd:?}");
    // Everything acknowledged is on the shared disk.
    let mut expect: Vec<(&str, &str)> = acked
        .iter()
        .chain(&during_ok)
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    expect.push(("n", "4"));
    expect.push(("after", "failover"));
    recovers(&ns, &disk, &expect);
}

#[test]
fn shared_disk_primary_goes_alone_and_writes_unheld_when_the_backup_crashes() {
    const TEST: &str = "shared_disk_primary_goes_alone_and_writes_unheld_when_the_backup_crashes";
    let _one = ftvm_testkit::one_at_a_time();
    let Some((dir, disk, ns)) = shared_setup(TEST, "sdalone") else {
        return;
    };
    let FtPair {
        primary,
        backup,
        backup_vm,
        arbiter,
        ..
    } = ft_pair(&ns, &disk, &dir.path().join("arbiter"));
    assert_eq!(common::redis_reply(&ns, &["SET", "paired", "yes"]), "OK");
    // The backup crashes; the client keeps writing: the first writes after it may wait in the
    // primary's disk barrier (no acknowledgement will come) until the primary goes alone.
    backup_vm.kick();
    let b = backup.join().expect("backup thread").expect("netns");
    assert!(
        matches!(b, Err(PairError::Paused(_))),
        "backup did not crash as planned"
    );
    let t0 = Instant::now();
    for i in 0..20 {
        let (k, v) = (format!("alone{i}"), format!("written-alone-{i}"));
        assert_eq!(common::redis_reply(&ns, &["SET", &k, &v]), "OK", "{k}");
    }
    eprintln!(
        "{TEST}: 20 SETs in {:?} after the backup crashed",
        t0.elapsed()
    );
    common::redis_shutdown(&ns);
    let (p, pcounters) = primary
        .join()
        .expect("primary thread")
        .expect("netns")
        .expect("primary setup");
    let p = p.unwrap_or_else(|e| panic!("primary: {}", error_chain(&e)));
    let waits = p.report.disk_waits.expect("disk waits");
    eprintln!("{TEST}: {pcounters:?} {waits:?} alone {:?}", p.alone);
    assert_eq!(p.alone.map(|t| t.generation), Some(2));
    assert_eq!(
        arbiter
            .current()
            .expect("arbiter")
            .map(|(g, w)| (g, w.to_string())),
        Some((2, "primary".to_string()))
    );
    assert_eq!(owner_generation(&disk), 2);
    assert!(waits.alone >= 20, "{waits:?}");
    assert_eq!(waits.writes, pcounters.gated);
    assert_eq!(pcounters.refused, 0);
    let mut expect = vec![("paired".to_string(), "yes".to_string())];
    expect.extend((0..20).map(|i| (format!("alone{i}"), format!("written-alone-{i}"))));
    let expect: Vec<(&str, &str)> = expect
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    recovers(&ns, &disk, &expect);
}

#[test]
fn shared_disk_write_fenced_off_by_a_newer_owner_stops_both_sides_as_superseded() {
    const TEST: &str =
        "shared_disk_write_fenced_off_by_a_newer_owner_stops_both_sides_as_superseded";
    let _one = ftvm_testkit::one_at_a_time();
    let Some((dir, disk, ns)) = shared_setup(TEST, "sdfence") else {
        return;
    };
    let FtPair {
        primary, backup, ..
    } = ft_pair(&ns, &disk, &dir.path().join("arbiter"));
    assert_eq!(common::redis_reply(&ns, &["SET", "owned", "gen1"]), "OK");
    assert_eq!(
        owner_generation(&disk),
        1,
        "the primary took the disk at its start"
    );
    // A newer owner takes the disk behind the pair's back (as a side of generation 5 would).
    let taken = DiskOwner::open(&disk)
        .and_then(|o| o.take(5, Duration::from_secs(2)))
        .expect("take 5");
    assert_eq!((taken.previous, taken.forced), (1, false));
    // The primary's next write is refused: the guest never answers.
    let out = ns
        .exec(
            "timeout",
            &[
                "2",
                "redis-cli",
                "-h",
                common::GUEST_IP,
                "SET",
                "fenced",
                "zombie-value",
            ],
        )
        .expect("redis-cli");
    assert!(
        String::from_utf8_lossy(&out.stdout).trim() != "OK",
        "a fenced-off write was acknowledged"
    );
    let (p, pcounters) = primary
        .join()
        .expect("primary thread")
        .expect("netns")
        .expect("primary setup");
    match &p {
        Err(PairError::Superseded { generation, winner }) => {
            assert_eq!(*generation, 5);
            assert!(winner.contains("shared disk"), "{winner}");
        }
        other => panic!(
            "the primary did not stop as superseded: {:?}",
            other.as_ref().map(|r| r.alone).map_err(|e| error_chain(e))
        ),
    }
    assert!(pcounters.refused >= 1, "{pcounters:?}");
    // The backup wins generation 2 on the arbiter but not the disk: it does not go live.
    let b = backup.join().expect("backup thread").expect("netns");
    match &b {
        Err(PairError::Superseded { generation, .. }) => assert_eq!(*generation, 5),
        Err(e) => panic!("backup: {}", error_chain(e)),
        Ok(_) => panic!("the backup went on although a newer generation owns the disk"),
    }
    eprintln!("{TEST}: primary disk {pcounters:?}");
    assert!(disk_has(&disk, "gen1"));
    assert!(
        !disk_has(&disk, "zombie-value"),
        "a fenced-off write reached the disk"
    );
    assert_eq!(owner_generation(&disk), 5);
}

/// The log of a primary that died in the middle of a disk exit, for a replaying VM: the events
/// of [`MemReplay`]; once they run out (at an external read, or at the end of an exit with no
/// event of a later exit left, as the backup's log reader decides) the replay reports it and
/// the run returns to its driver ([`RunOutcome::ReplayExhausted`]), which goes live
/// ([`go_live_where_the_log_ends`]).
struct CutLog {
    events: MemReplay,
}

impl ReplaySource for CutLog {
    fn external_read(&mut self, exit: u64, addr: u64) -> Result<u64, ReplayError> {
        if self.events.remaining() == 0 {
            return Err(ReplayError::Exhausted { exit });
        }
        self.events.external_read(exit, addr)
    }
    fn guest_writes(
        &mut self,
        exit: u64,
        apply: &mut dyn FnMut(u64, &[u8]),
    ) -> Result<(), ReplayError> {
        self.events.guest_writes(exit, apply)?;
        if self.events.remaining() == 0 {
            return Err(ReplayError::Exhausted { exit });
        }
        Ok(())
    }
}

/// Runs the replaying `vm` one exit at a time until `done` holds (or 20 s pass); where its log
/// runs out, goes live as the backup's go-live does: the disk is taken over with
/// [`BlkHandle::go_live`](ftvm_vmm_core::devices::virtio::blk::BlkHandle::go_live) (noted in
/// `live_at`: the exit and the requests redone), the inputs become live, and the run that
/// follows completes the exit left pending.
fn go_live_where_the_log_ends(
    vm: &mut Vm,
    (disk, mem): (&BlkHandle, &GuestMem),
    live_at: &mut Option<(u64, usize)>,
    done: impl Fn(&Vm) -> bool,
) {
    let t0 = Instant::now();
    while !done(vm) {
        let next = vm.stats().total() + 1;
        match vm.run_until(Some(next)) {
            Ok(RunOutcome::ExitLimit) => {}
            Ok(RunOutcome::ReplayExhausted { exit, .. }) => {
                assert_eq!(*live_at, None, "the replay ran out twice");
                *live_at = Some((exit, disk.go_live(exit, mem)));
                vm.set_inputs(Inputs::default());
            }
            other => panic!("backup: the VM stopped: {other:?}"),
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "backup: too slow");
    }
}

/// Runs `vm` one exit at a time until `done` holds (or it stops, or 20 s pass).
fn step_until(vm: &mut Vm, what: &str, done: impl Fn(&Vm) -> bool) {
    let t0 = Instant::now();
    while !done(vm) {
        let next = vm.stats().total() + 1;
        match vm.run_until(Some(next)) {
            Ok(RunOutcome::ExitLimit) => {}
            other => panic!("{what}: the VM stopped: {other:?}"),
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "{what}: too slow");
    }
}

#[test]
fn shared_disk_go_live_inside_a_disk_exit_completes_the_request() {
    const TEST: &str = "shared_disk_go_live_inside_a_disk_exit_completes_the_request";
    let _one = ftvm_testkit::one_at_a_time();
    if ftvm_testkit::skip::if_missing(TEST, ftvm_testkit::kvm_missing()) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let elf = guests::by_name("kv").expect("kv guest");
    let config = |disk: &Path| VmConfig {
        disk: Some(disk.to_path_buf()),
        ..backup_config(disk).0
    };
    // The primary: kv boots, reads its log header from the disk (one request per exit), finds
    // a blank disk and writes a fresh header. Recorded up to the end of the first read's exit.
    let pdisk = common::blank_disk(dir.path(), "primary.img");
    let mut primary = Vm::new(&config(&pdisk), elf).expect("primary vm");
    let rec = MemRecorder::default();
    primary.set_inputs(Inputs::Live(Box::new(rec.clone())));
    let reads = |vm: &Vm| vm.disk().expect("disk").counters().reads;
    step_until(&mut primary, "primary", |vm| reads(vm) >= 1);
    let read_exit = primary.stats().total() - 1;
    let log = rec.log.lock().unwrap().clone();
    // That exit logged the read data first, then the status byte and the used ring.
    let of_exit: Vec<&Event> = log
        .iter()
        .filter(|e| matches!(e, Event::Write { exit, .. } if *exit == read_exit))
        .collect();
    assert!(of_exit.len() >= 3, "{of_exit:?}");
    assert!(
        matches!(of_exit[0], Event::Write { data, .. } if data.len() == 512),
        "{:?}",
        of_exit[0]
    );
    // The primary dies after logging the read data, before the status: the backup's log ends
    // inside the disk exit.
    let cut: Vec<Event> = log
        .iter()
        .filter(|e| e.exit() < read_exit)
        .cloned()
        .chain(std::iter::once(of_exit[0].clone()))
        .collect();
    step_until(&mut primary, "primary", |vm| {
        vm.disk().expect("disk").counters().writes >= 1
    });
    // The backup, on its shared-disk replica (equal to the primary's disk before it ran).
    let bdisk = common::blank_disk(dir.path(), "backup.img");
    let mut backup = Vm::new(&config(&bdisk), elf).expect("backup vm");
    let disk = backup.disk().expect("disk").clone();
    disk.set_shared(true);
    disk.set_mode(DiskMode::Replay);
    let mut live_at = None;
    backup.set_inputs(Inputs::Replay(Box::new(CutLog {
        events: MemReplay::new(cut),
    })));
    // Without the go-live completion the guest would find the status byte at 0xFF (an I/O
    // error) and power off with its disk-failure code instead of writing the fresh header.
    let mem = backup.memory().clone();
    go_live_where_the_log_ends(&mut backup, (&disk, &mem), &mut live_at, |_| {
        disk.counters().writes >= 1
    });
    let c = disk.counters();
    eprintln!("{TEST}: read at exit {read_exit}, live at {live_at:?}, {c:?}");
    assert_eq!(live_at, Some((read_exit, 1)));
    // The read executed at go-live (the only disk access of the replay), then kv's own write.
    assert_eq!(
        (c.redone, c.reads, c.writes, c.dropped),
        (1, 1, 1, 0),
        "{c:?}"
    );
    assert!(
        std::fs::read(&bdisk).unwrap() == std::fs::read(&pdisk).unwrap(),
        "the backup's disk differs from the primary's after the same boot"
    );
}

// ---------------------------------------------------------------------------------------------
// `ftvm primary/backup --shared-disk` as real processes
// ---------------------------------------------------------------------------------------------

#[test]
fn shared_disk_processes_refuse_a_mode_mismatch() {
    const TEST: &str = "shared_disk_processes_refuse_a_mode_mismatch";
    let _one = ftvm_testkit::one_at_a_time();
    let Some(bin) = ftvm_binary(TEST) else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = common::blank_disk(dir.path(), "shared.img");
    let peer = format!("127.0.0.1:{}", free_port());
    let args = |role: &str, shared: bool| {
        let mut v: Vec<String> = [
            role,
            "--guest",
            "cpu",
            "--mem",
            "16M",
            "--cmdline",
            "size=64k rounds=1",
            "--disk",
            &disk.display().to_string(),
            "--peer",
            &peer,
            "--transport",
            "tcp",
            "--log",
            "error",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if shared {
            v.push("--shared-disk".into());
        }
        if role == "primary" {
            // A primary-only flag (`ftvm backup` refuses it).
            v.extend(["--throttle-target-ms".into(), "0".into()]);
        }
        v
    };
    let backup = Command::new(&bin)
        .args(args("backup", true))
        .env("RUST_BACKTRACE", "0")
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn backup");
    let primary = Command::new(&bin)
        .args(args("primary", false))
        .env("RUST_BACKTRACE", "0")
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn primary");
    let (po, bo) = common::wait_pair(primary, backup);
    for out in [&po, &bo] {
        let text = String::from_utf8_lossy(&out.stderr);
        // Both sides refuse with the pairing-refused status (ftvm/src/exit.rs), naming the field.
        assert_eq!(out.status.code(), Some(205), "{text}");
        assert!(
            text.contains("settings differ") && text.contains("shared_disk"),
            "{text}"
        );
    }
}

#[test]
fn shared_disk_processes_kv_under_redis_benchmark() {
    const TEST: &str = "shared_disk_processes_kv_under_redis_benchmark";
    let _one = ftvm_testkit::one_at_a_time();
    let Some(bin) = ftvm_binary(TEST) else {
        return;
    };
    if ftvm_testkit::skip_without(TEST, "redis-benchmark", "redis-tools") {
        return;
    }
    let Some((dir, disk, ns)) = shared_setup(TEST, "sdproc") else {
        return;
    };
    let peer = format!("127.0.0.1:{}", free_port());
    let net = format!("tap:{}", common::TAP);
    let cmdline = kv_cmdline();
    let d = disk.display().to_string();
    let spawn = |role: &str| -> Child {
        let tag = if role == "primary" { "p" } else { "b" };
        let rep = dir.path().join(format!("{tag}.json")).display().to_string();
        let args = [
            role,
            "--guest",
            "kv",
            "--mem",
            "64M",
            "--disk",
            &d,
            "--shared-disk",
            "--net",
            &net,
            "--cmdline",
            &cmdline,
            "--peer",
            &peer,
            "--transport",
            "tcp",
            "--report",
            &rep,
            "--log",
            "warn",
        ];
        let mut args: Vec<&str> = args.to_vec();
        if role == "primary" {
            // A primary-only flag (`ftvm backup` refuses it).
            args.extend(["--throttle-target-ms", "0"]);
        }
        ns.command(&bin.display().to_string(), &args)
            .env("RUST_BACKTRACE", "0")
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn")
    };
    let backup = spawn("backup");
    std::thread::sleep(Duration::from_millis(300));
    let primary = spawn("primary");
    common::wait_pong(&ns, "kv in shared-disk mode did not answer PING");
    let out = common::redis_benchmark(&ns, "2000", "4", "set");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success() && text.contains("SET"), "{text}");
    eprintln!("{TEST}: {}", text.trim().rsplit('\r').next().unwrap_or(""));
    assert_eq!(
        common::redis_reply(&ns, &["SET", "sdkey", "shared-value"]),
        "OK"
    );
    common::redis_shutdown(&ns);
    common::wait_pair_ok(primary, backup);
    let p = report(&dir.path().join("p.json"));
    let b = report(&dir.path().join("b.json"));
    eprintln!(
        "{TEST}: primary disk {} waits {}; backup disk {}",
        p["shared_disk"], p["disk_waits"], b["shared_disk"]
    );
    assert_eq!(b["mem_digest"], p["mem_digest"]);
    let writes = p["shared_disk"]["writes"].as_u64().expect("primary writes");
    assert!(writes >= 100, "{p}");
    assert_eq!(p["disk_waits"]["writes"].as_u64(), Some(writes));
    assert_eq!(b["shared_disk"]["dropped"].as_u64(), Some(writes), "{b}");
    assert_eq!(b["shared_disk"]["writes"], 0);
    assert_eq!(b["shared_disk"]["reads"], 0);
    assert_eq!(p["disk_digest"], b["disk_digest"]);
    recovers(&ns, &disk, &[("sdkey", "shared-value")]);
}
