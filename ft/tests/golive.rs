//! Go-live in one process: a primary and a backup of the `cpu` guest over TCP on loopback, a
//! file arbiter in a temporary directory and real UDP failure detectors with a short timeout.
//! A "crash" stops a side's VM and drops its channel end and detector, as a killed process
//! would.
//!
//! - the primary crashes mid-run: the backup goes live in generation 2 and the guest ends with
//!   the checksum of an undisturbed run;
//! - the backup crashes: the primary goes alone in generation 2 and releases what it held;
//! - the arbiter is unreachable: the backup does not go live until it is back;
//! - a primary that lost the arbiter never releases an output;
//! - a backup that finds an output differing from the primary's while it drains its log after
//!   the primary crashed refuses to go live;
//! - `kv` on a TAP in a network namespace: the backup takes over the (persistent) TAP when the
//!   primary crashes, and `redis-cli` finds every acknowledged write afterwards.

use ftvm_testkit::kv as common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ftvm_channel::Config;
use ftvm_ft::arbiter::{Arbiter, FileArbiter};
use ftvm_ft::backup::{LogReader, Tamper};
use ftvm_ft::error::PairError;
use ftvm_ft::golive::{BackupFtReport, FtConfig, LiveReport};
use ftvm_ft::log::Entry;
use ftvm_ft::node::NodeId;
use ftvm_ft::output::Sink;
use ftvm_ft::primary::{LogWriter, PairOptions, PrimaryHooks};
use ftvm_ft::run::{run_backup_ft, run_primary_ft, PrimaryFtReport};
use ftvm_ft::transition::Transition;
use ftvm_ft::Role;
use ftvm_testkit::link::TcpLink;
use ftvm_testkit::require_kvm;
use ftvm_testkit::CountingArbiter;
use ftvm_vmm_core::digest::pairing_digest;
use ftvm_vmm_core::guests;
use ftvm_vmm_core::vm::{buffer_console, RunOutcome, Vm, VmConfig, VmControl};

/// Long enough to stop a side mid-run (the tests stop a side about 0.3 s after the start): 600
/// rounds took ~3 s on an idle core once, but on a faster host the guest finished before the
/// stop, so 2400 (the whole file's tests take ~6 s idle).
const CMDLINE: &str = "size=8M rounds=2400 seed=7 timing";
const MEM: u64 = 32 << 20;

fn vm_config() -> (VmConfig, Arc<Mutex<Vec<u8>>>) {
    let (console, buf) = buffer_console();
    (
        VmConfig {
            mem_size: MEM,
            cmdline: CMDLINE.into(),
            console,
            ..Default::default()
        },
        buf,
    )
}

fn channel_config() -> Config {
    let elf = guests::by_name("cpu").expect("cpu guest");
    Config {
        digest: pairing_digest(elf, CMDLINE, MEM, None).expect("digest"),
        ..Config::default()
    }
}

/// Bytes written to a sink, and when the first arrived.
#[derive(Clone, Default)]
struct Collected(Arc<Mutex<(Vec<u8>, Option<Instant>)>>);

impl Collected {
    fn sink(&self) -> Sink {
        let c = self.0.clone();
        Box::new(move |d: &[u8]| {
            let mut g = c.lock().unwrap();
            g.0.extend_from_slice(d);
            g.1.get_or_insert_with(Instant::now);
        })
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap().0).into_owned()
    }
    fn first_at(&self) -> Option<Instant> {
        self.0.lock().unwrap().1
    }
}

/// A short description of a run's result (reports hold large histograms).
fn brief<T>(r: &Result<T, PairError>, what: impl Fn(&T) -> String) -> String {
    match r {
        Ok(v) => format!("Ok({})", what(v)),
        Err(e) => format!("Err({})", ftvm_vmm_core::error_chain(e)),
    }
}

fn backup_kind(b: &BackupFtReport) -> String {
    match b {
        BackupFtReport::Finished(r) => format!("finished at exit {}", r.exits),
        BackupFtReport::WentLive(l) => format!("went live: {:?}", l.timings),
    }
}

/// The backup's report of a run in which it had to go live (panics, saying how it ended
/// instead, when it did not).
fn went_live(b: BackupFtReport) -> Box<LiveReport> {
    match b {
        BackupFtReport::WentLive(live) => live,
        other => panic!("the backup did not go live: {}", backup_kind(&other)),
    }
}

/// Asserts that `text` (a console's) holds the checksum line `expected`.
fn assert_checksum(text: &str, expected: &str) {
    assert_eq!(checksum_line(text).as_deref(), Some(expected), "{text}");
}

fn checksum_line(text: &str) -> Option<String> {
    text.lines()
        .find(|l| l.starts_with("cpu: checksum="))
        .map(str::to_string)
}

/// The checksum line of an undisturbed run without FT (computed once, shared by the tests).
fn expected_checksum() -> String {
    static EXPECTED: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    EXPECTED.get_or_init(undisturbed_checksum).clone()
}

fn undisturbed_checksum() -> String {
    let (cfg, buf) = vm_config();
    let mut vm = Vm::new(&cfg, guests::by_name("cpu").expect("cpu")).expect("vm");
    assert_eq!(vm.run().expect("run"), RunOutcome::PoweredOff(0));
    let text = String::from_utf8_lossy(&buf.lock().unwrap()).into_owned();
    checksum_line(&text).unwrap_or_else(|| panic!("no checksum in {text}"))
}

/// Where the pair's parts are, and how each side is set up.
struct PairSpec {
    arbiter: Arc<dyn Arbiter>,
    primary_ft: FtConfig,
    backup_ft: FtConfig,
    stall_acks: bool,
    /// Alters the entries the backup receives.
    tamper: Option<Tamper>,
}

impl PairSpec {
    /// Detectors heartbeating each other.
    fn new(arbiter: Arc<dyn Arbiter>) -> Self {
        let [pa, ba] = common::free_udp();
        PairSpec {
            primary_ft: common::ft_config(&arbiter, "primary", pa, ba),
            backup_ft: common::ft_config(&arbiter, "backup", ba, pa),
            arbiter,
            stall_acks: false,
            tamper: None,
        }
    }
}

/// Records the transitions `cfg`'s side reports.
fn record_transitions(cfg: &mut FtConfig) -> Arc<Mutex<Vec<Transition>>> {
    let got = Arc::new(Mutex::new(Vec::new()));
    let g = Arc::clone(&got);
    cfg.on_transition = Some(Arc::new(move |t| g.lock().unwrap().push(t.clone())));
    got
}

struct Running {
    primary: std::thread::JoinHandle<Result<PrimaryFtReport, PairError>>,
    backup: std::thread::JoinHandle<Result<BackupFtReport, PairError>>,
    primary_vm: VmControl,
    backup_vm: VmControl,
    primary_console: Collected,
    backup_console: Collected,
    /// What the backup's guest printed while replaying (the primary's guest printed it too).
    backup_replayed: Arc<Mutex<Vec<u8>>>,
    stall: Arc<AtomicBool>,
}

fn start(spec: PairSpec) -> Running {
    let elf = guests::by_name("cpu").expect("cpu guest");
    let (backup_end, primary_end) = TcpLink::new().connect().expect("link");
    let (btx, brx) = mpsc::channel();
    let backup_console = Collected::default();
    let bc = backup_console.clone();
    let bft = spec.backup_ft;
    let tamper = spec.tamper;
    let (cfg, backup_replayed) = vm_config();
    let buf = Arc::clone(&backup_replayed);
    let backup = std::thread::spawn(move || {
        let mut vm = Vm::new(&cfg, elf).expect("backup vm");
        btx.send(vm.control()).expect("report control");
        let rx = backup_end.start(channel_config())?;
        let reader = LogReader::new(rx, Default::default(), tamper);
        run_backup_ft(&mut vm, reader, (bft, None), Some((buf, bc.sink())))
    });
    let backup_vm = brx.recv().expect("backup control");
    let stall = Arc::new(AtomicBool::new(false));
    let (s2, stall_acks) = (stall.clone(), spec.stall_acks);
    let (ptx, prx) = mpsc::channel();
    let primary_console = Collected::default();
    let pc = primary_console.clone();
    let pft = spec.primary_ft;
    let primary = std::thread::spawn(move || {
        let (cfg, buf) = vm_config();
        let mut vm = Vm::new(&cfg, elf).expect("primary vm");
        ptx.send(vm.control()).expect("report control");
        let sender = primary_end.stall_acks(s2.clone()).start(channel_config())?;
        // After the handshake (its answer is a frame the primary receives).
        s2.store(stall_acks, Ordering::Release);
        let writer = LogWriter::new(sender, Default::default());
        let opts = PairOptions {
            digest_interval: 50,
            ack_timeout: Duration::from_secs(20),
            ..Default::default()
        };
        // The writer (the channel) and the detector go when this thread ends: a crash.
        run_primary_ft(
            &mut vm,
            &writer,
            &opts,
            Some((buf, pc.sink())),
            &PrimaryHooks::default(),
            (pft, None),
        )
    });
    let primary_vm = prx.recv().expect("primary control");
    let _ = spec.arbiter;
    Running {
        primary,
        backup,
        primary_vm,
        backup_vm,
        primary_console,
        backup_console,
        backup_replayed,
        stall,
    }
}

fn file_arbiter(dir: &Path) -> Arc<dyn Arbiter> {
    Arc::new(FileArbiter::new(dir))
}

fn current(arbiter: &Arc<dyn Arbiter>) -> Option<(u64, String)> {
    arbiter
        .current()
        .expect("arbiter reachable")
        .map(|(g, w)| (g, w.to_string()))
}

/// Waits (at most 20 s) until the backup replayed the guest's first line: the primary's guest
/// printed it, and the primary holds it until it is acknowledged.
fn wait_first_line_replayed(r: &Running) {
    let t = Instant::now();
    while !r.backup_replayed.lock().unwrap().contains(&b'\n') {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the guest printed nothing"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Waits until the primary holds generation 1 and has run a while.
fn wait_started(r: &Running, arbiter: &Arc<dyn Arbiter>) {
    let t = Instant::now();
    while current(arbiter).is_none() || r.primary_vm.exits() < 2 {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the primary did not start"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn golive_backup_takes_over_when_the_primary_crashes() {
    let _one = ftvm_testkit::one_at_a_time();
    require_kvm!("golive_backup_takes_over_when_the_primary_crashes");
    let expected = expected_checksum();
    let dir = tempfile::tempdir().expect("tempdir");
    let arbiter = file_arbiter(dir.path());
    let mut spec = PairSpec::new(Arc::clone(&arbiter));
    let transitions = record_transitions(&mut spec.backup_ft);
    let r = start(spec);
    wait_started(&r, &arbiter);
    std::thread::sleep(Duration::from_millis(300));
    // Crash the primary mid-run.
    r.primary_vm.kick();
    let p = r.primary.join().expect("primary thread");
    assert!(
        matches!(p, Err(PairError::Paused(_))),
        "{}",
        brief(&p, |r| format!("alone {:?}", r.alone))
    );
    let b = r.backup.join().expect("backup thread").expect("backup");
    let live = went_live(b);
    assert_eq!(live.code, 0);
    assert_eq!(live.timings.generation, 2);
    assert_eq!(current(&arbiter), Some((2, "backup".into())));
    // The typed events: the primary presumed failed, then live with the report's timings.
    let t = transitions.lock().unwrap().clone();
    assert!(
        matches!(t.first(), Some(Transition::PeerPresumedFailed { silent_for }) if *silent_for >= Duration::from_millis(200)),
        "{t:?}"
    );
    assert_eq!(t.last(), Some(&Transition::Live(live.timings)), "{t:?}");
    assert!(
        live.timings.detection >= Duration::from_millis(200),
        "{:?}",
        live.timings
    );
    assert!(
        live.timings.total < Duration::from_secs(5),
        "{:?}",
        live.timings
    );
    // The guest finished as it would have without the failure; what it printed after going
    // live was released by the new primary.
    let text = r.backup_console.text();
    assert_checksum(&text, &expected);
    assert!(checksum_line(&r.primary_console.text()).is_none());
    assert!(live.exits > live.timings.at_exit);
}

/// The primary crashes while the backup is behind; draining its log, the backup meets an
/// output whose digest differs from the primary's (the first console line, which the primary
/// had released: corrupted on the way here, the replay held back until the crash). It stops
/// with `diverged at exit N: output …` and never goes live: the arbiter stays at generation 1
/// and nothing is released on its side.
#[test]
fn golive_backup_refuses_to_go_live_when_a_drained_output_differs() {
    require_kvm!("golive_backup_refuses_to_go_live_when_a_drained_output_differs");
    let dir = tempfile::tempdir().expect("tempdir");
    let arbiter = file_arbiter(dir.path());
    let crashed = Arc::new(AtomicBool::new(false));
    let c2 = crashed.clone();
    let mut spec = PairSpec::new(Arc::clone(&arbiter));
    spec.tamper = Some(Box::new(move |_, e| {
        if let Entry::Output { digest, .. } = e {
            // Hold the replay here until the primary is gone, then hand over a wrong digest.
            let t = Instant::now();
            while !c2.load(Ordering::Acquire) && t.elapsed() < Duration::from_secs(20) {
                std::thread::sleep(Duration::from_millis(5));
            }
            digest.hash ^= 1;
        }
    }));
    let r = start(spec);
    wait_started(&r, &arbiter);
    // The primary released its first line: the backup's receiver acknowledged it.
    let t = Instant::now();
    while r.primary_console.first_at().is_none() {
        assert!(t.elapsed() < Duration::from_secs(20), "nothing released");
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(100));
    r.primary_vm.kick();
    let p = r.primary.join().expect("primary thread");
    assert!(p.is_err(), "{}", brief(&p, |r| format!("{:?}", r.alone)));
    crashed.store(true, Ordering::Release);
    let b = r.backup.join().expect("backup thread");
    match &b {
        Err(e @ PairError::Diverged { .. }) => {
            let text = e.to_string();
            assert!(text.contains(": output of the console differs"), "{text}");
        }
        other => panic!("expected a divergence: {}", brief(other, backup_kind)),
    }
    assert_eq!(current(&arbiter), Some((1, "primary".into())), "went live");
    assert_eq!(r.backup_console.text(), "", "the backup released output");
    assert!(r.primary_console.text().starts_with("cpu: size="));
}

#[test]
fn golive_primary_goes_alone_when_the_backup_crashes() {
    let _one = ftvm_testkit::one_at_a_time();
    require_kvm!("golive_primary_goes_alone_when_the_backup_crashes");
    let expected = expected_checksum();
    let dir = tempfile::tempdir().expect("tempdir");
    let arbiter = file_arbiter(dir.path());
    let mut spec = PairSpec::new(Arc::clone(&arbiter));
    // Nothing is acknowledged: the first line the guest prints is held.
    spec.stall_acks = true;
    let transitions = record_transitions(&mut spec.primary_ft);
    let r = start(spec);
    wait_started(&r, &arbiter);
    // The guest printed its first line (the backup replayed it), and the primary holds it.
    wait_first_line_replayed(&r);
    assert_eq!(r.primary_console.text(), "", "released without an ack");
    // Crash the backup.
    r.backup_vm.kick();
    let b = r.backup.join().expect("backup thread");
    assert!(
        matches!(b, Err(PairError::Paused(_))),
        "{}",
        brief(&b, backup_kind)
    );
    let p = r.primary.join().expect("primary thread").expect("primary");
    let alone = p.alone.expect("the primary went alone");
    assert_eq!((alone.generation, p.generation), (2, 2));
    let t = transitions.lock().unwrap().clone();
    // (The detector may still presume the backup failed after the link said so.)
    assert!(t.contains(&Transition::Alone(alone)), "{t:?}");
    assert_eq!(current(&arbiter), Some((2, "primary".into())));
    assert_eq!(p.report.code, 0);
    let o = &p.report.outputs;
    assert_eq!(o.released, o.produced);
    assert!(o.released_alone >= 2, "{} released alone", o.released_alone);
    assert_eq!(o.early, 0);
    let text = r.primary_console.text();
    assert!(text.starts_with("cpu: size="), "{text}");
    assert_checksum(&text, &expected);
    drop(r.stall);
}

/// Makes the arbiter's directory unreachable (a file in its place) until dropped.
struct Outage {
    dir: PathBuf,
    away: PathBuf,
}

impl Outage {
    fn start(dir: &Path) -> Self {
        let away = dir.with_extension("away");
        std::fs::rename(dir, &away).expect("move the arbiter directory away");
        std::fs::write(dir, b"not a directory").expect("file in its place");
        Outage {
            dir: dir.to_path_buf(),
            away,
        }
    }
}

impl Drop for Outage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.dir);
        let _ = std::fs::rename(&self.away, &self.dir);
    }
}

#[test]
fn golive_backup_waits_for_an_unreachable_arbiter() {
    let _one = ftvm_testkit::one_at_a_time();
    require_kvm!("golive_backup_waits_for_an_unreachable_arbiter");
    let expected = expected_checksum();
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("arbiter");
    std::fs::create_dir(&dir).expect("arbiter dir");
    let counting = Arc::new(CountingArbiter::new(file_arbiter(&dir)));
    let arbiter: Arc<dyn Arbiter> = counting.clone();
    let r = start(PairSpec::new(Arc::clone(&arbiter)));
    wait_started(&r, &arbiter);
    std::thread::sleep(Duration::from_millis(200));
    let outage = Outage::start(&dir);
    assert!(
        arbiter.current().is_err_and(|e| e.is_unreachable()),
        "the outage must make it unreachable"
    );
    let since = counting.unreachable();
    r.primary_vm.kick();
    let p = r.primary.join().expect("primary thread");
    assert!(
        matches!(p, Err(PairError::Paused(_))),
        "{}",
        brief(&p, |r| format!("alone {:?}", r.alone))
    );
    // The backup detected the failure and is claiming the next generation: its claims fail
    // (unreachable) and it keeps waiting.
    counting.wait_unreachable(since, 5, Duration::from_secs(10));
    assert!(
        r.backup_console.first_at().is_none(),
        "live without the arbiter"
    );
    assert!(!r.backup.is_finished());
    let restored = Instant::now();
    drop(outage);
    let b = r.backup.join().expect("backup thread").expect("backup");
    let live = went_live(b);
    assert!(r.backup_console.first_at().expect("output after go-live") > restored);
    // (How long the take-over itself waited depends on when the replay caught up with the
    // point where the primary stopped; what matters is that nothing went live before.)
    assert!(live.timings.arbiter > Duration::ZERO, "{:?}", live.timings);
    assert_eq!(current(&arbiter), Some((2, "backup".into())));
    let text = r.backup_console.text();
    assert_checksum(&text, &expected);
}

#[test]
fn golive_primary_that_lost_the_arbiter_releases_nothing() {
    let _one = ftvm_testkit::one_at_a_time();
    require_kvm!("golive_primary_that_lost_the_arbiter_releases_nothing");
    let dir = tempfile::tempdir().expect("tempdir");
    let arbiter = file_arbiter(dir.path());
    let [pa, ba, nowhere] = common::free_udp();
    let mut spec = PairSpec::new(Arc::clone(&arbiter));
    // The primary hears no heartbeat (the backup's go elsewhere): it will presume the backup
    // failed; the backup hears the primary.
    spec.primary_ft = common::ft_config(&arbiter, "primary", pa, ba);
    spec.backup_ft = common::ft_config(&arbiter, "backup", ba, nowhere);
    spec.stall_acks = true;
    let transitions = record_transitions(&mut spec.primary_ft);
    let r = start(spec);
    let t = Instant::now();
    while current(&arbiter).is_none() {
        assert!(t.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(1));
    }
    // The guest printed a line the primary holds (the backup replayed it: a loaded suite run
    // once fenced the primary before its guest had printed anything)...
    wait_first_line_replayed(&r);
    // ...and the backup wins generation 2 first (as if it had gone live).
    let backup = NodeId::new("backup").expect("id");
    assert!(arbiter.try_acquire(2, &backup).expect("acquire").is_won());
    let p = r.primary.join().expect("primary thread");
    match &p {
        Err(PairError::Superseded { generation, winner }) => {
            assert_eq!((*generation, winner.as_str()), (2, "backup"));
            let lost = Transition::LostTakeOver {
                role: Role::Primary,
                generation: 2,
                winner: "backup".into(),
            };
            let t = transitions.lock().unwrap().clone();
            assert!(t.contains(&lost), "{t:?}");
        }
        other => panic!(
            "expected Superseded, got {}",
            brief(other, |r| format!("alone {:?}", r.alone))
        ),
    }
    // The primary has returned (its output releaser with it) holding every line: nothing came
    // out of the fenced primary.
    assert_eq!(
        r.primary_console.text(),
        "",
        "a fenced primary released output"
    );
    // The output existed: the backup replayed the line the primary held.
    let b = r.backup.join().expect("backup thread").expect("backup");
    let BackupFtReport::WentLive(live) = b else {
        panic!(
            "the backup (holder of generation 2) did not go live: {}",
            backup_kind(&b)
        );
    };
    let replica = String::from_utf8_lossy(&live.console_replayed).into_owned();
    assert!(replica.starts_with("cpu: size="), "{replica:?}");
}

#[test]
fn golive_stale_primary_is_refused_and_the_backup_runs_the_guest() {
    let _one = ftvm_testkit::one_at_a_time();
    require_kvm!("golive_stale_primary_is_refused_and_the_backup_runs_the_guest");
    let expected = expected_checksum();
    let dir = tempfile::tempdir().expect("tempdir");
    let arbiter = file_arbiter(dir.path());
    // The pair already moved on: the backup took generation 2 after generation 1.
    let (old, backup) = (
        NodeId::new("primary").expect("id"),
        NodeId::new("backup").expect("id"),
    );
    assert!(arbiter.try_acquire(1, &old).expect("acquire").is_won());
    assert!(arbiter.try_acquire(2, &backup).expect("acquire").is_won());
    // A primary restarted with its old state (generation 1) must not run.
    let r = start(PairSpec::new(Arc::clone(&arbiter)));
    let p = r.primary.join().expect("primary thread");
    match &p {
        Err(PairError::Superseded { generation, winner }) => {
            assert_eq!((*generation, winner.as_str()), (2, "backup"));
        }
        other => panic!(
            "expected Superseded, got {}",
            brief(other, |r| format!("alone {:?}", r.alone))
        ),
    }
    assert_eq!(r.primary_console.text(), "");
    // The backup (holder of generation 2) got no log at all: it goes live at the start.
    let b = r.backup.join().expect("backup thread").expect("backup");
    let live = went_live(b);
    assert_eq!((live.timings.at_exit, live.entries), (0, 0));
    let text = r.backup_console.text();
    assert_checksum(&text, &expected);
}

#[test]
fn golive_kv_keeps_its_data_and_address_after_the_primary_crashes() {
    const TEST: &str = "golive_kv_keeps_its_data_and_address_after_the_primary_crashes";
    let _one = ftvm_testkit::one_at_a_time();
    if ftvm_testkit::skip::if_missing(TEST, common::net_missing()) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (pdisk, bdisk) = common::blank_disks(dir.path());
    let adir = dir.path().join("arbiter");
    std::fs::create_dir(&adir).expect("arbiter dir");
    let arbiter = file_arbiter(&adir);
    let ns = common::namespace("golive");
    let cmdline = format!("ip={}/24 gw=10.0.2.1 port=6379", common::GUEST_IP);
    let elf = guests::by_name("kv").expect("kv guest");
    let chan = |disk: &Path| Config {
        digest: pairing_digest(elf, &cmdline, 64 << 20, Some(disk)).expect("digest"),
        ..Config::default()
    };
    let (pcfg, bcfg) = (chan(&pdisk), chan(&bdisk));
    let spec = PairSpec::new(Arc::clone(&arbiter));
    let mut bft = spec.backup_ft;
    bft.service_tap = Some(common::TAP.into());
    let pft = spec.primary_ft;
    // Connected from the host's namespace (loopback is per namespace), used inside `ns`.
    let (backup_end, primary_end) = TcpLink::new().ring(1 << 22).connect().expect("link");
    let backup_console = Collected::default();
    let bc = backup_console.clone();
    let bcmd = cmdline.clone();
    let backup = ns
        .spawn("ft-backup", move || {
            let (cfg, buf) = common::backup_vm_config(64 << 20, bcmd, bdisk);
            let mut vm = Vm::new(&cfg, elf).expect("backup vm");
            let rx = backup_end.start(bcfg)?;
            let reader = LogReader::new(rx, Default::default(), None);
            run_backup_ft(&mut vm, reader, (bft, None), Some((buf, bc.sink())))
        })
        .expect("spawn backup");
    let (cfg, pbuf) = common::primary_vm_config(64 << 20, cmdline, pdisk);
    let pconsole = pbuf.clone();
    let (ptx, prx) = mpsc::channel();
    let primary = ns
        .spawn("ft-primary", move || {
            let mut vm = Vm::new(&cfg, elf).expect("primary vm");
            ptx.send(vm.control()).expect("control");
            let sender = primary_end.start(pcfg)?;
            let writer = LogWriter::new(sender, Default::default());
            let opts = PairOptions {
                ack_timeout: Duration::from_secs(10),
                ..Default::default()
            };
            // Returning drops the VM (its TAP file), the channel and the detector: a crash.
            let ft = (pft, None);
            run_primary_ft(&mut vm, &writer, &opts, None, &PrimaryHooks::default(), ft)
        })
        .expect("spawn primary");
    let primary_vm = prx.recv().expect("primary control");
    common::wait_ready_with(&ns, &pconsole);
    assert_eq!(common::redis_reply(&ns, &["SET", "before", "crash"]), "OK");
    for i in 1..=3 {
        assert_eq!(common::redis_reply(&ns, &["INCR", "n"]), i.to_string());
    }
    // Crash the primary; the clients retry until the new primary answers.
    let crashed = Instant::now();
    primary_vm.kick();
    let p = primary.join().expect("primary thread").expect("netns");
    assert!(
        matches!(p, Err(PairError::Paused(_))),
        "{}",
        brief(&p, |r| format!("alone {:?}", r.alone))
    );
    let reply = common::get_after_crash(&ns, "before", crashed, || {
        format!("; backup console: {}", backup_console.text())
    });
    let failover = crashed.elapsed();
    eprintln!("{TEST}: first reply {failover:?} after the crash");
    assert_eq!(reply, "crash");
    assert_eq!(common::redis_reply(&ns, &["INCR", "n"]), "4");
    assert_eq!(
        common::redis_reply(&ns, &["SET", "after", "failover"]),
        "OK"
    );
    assert_eq!(common::redis_reply(&ns, &["GET", "after"]), "failover");
    common::redis_shutdown(&ns);
    let b = backup
        .join()
        .expect("backup thread")
        .expect("netns")
        .expect("backup");
    let live = went_live(b);
    assert_eq!((live.code, live.timings.generation), (0, 2));
    assert_eq!(current(&arbiter), Some((2, "backup".into())));
    let tx = live.tx.expect("net device");
    assert!(tx.direct >= 4, "{tx:?}");
}
