//! When the backup can take over, and when it must not: real `ftvm primary` / `ftvm backup`
//! processes in a network namespace with a file arbiter ([`ftvm::scenario`]).
//! - A guest that makes no VM exit for seconds still fails over when its primary is SIGKILLed
//!   mid-computation: the backup decides between two exits, not only at one.
//! - A backup whose own copy of the disk fills up (own-copy mode, its image on a small tmpfs)
//!   stops with `CANNOT_TAKE_OVER` and tells the primary, which goes on alone and keeps serving;
//!   no acknowledged write is lost, and the primary's image holds them all.
//!
//! Needs root and /dev/kvm (prints SKIP otherwise).

mod common;

use std::time::{Duration, Instant};

use ftvm::client::Reply;
use ftvm::scenario::{Node, Scenario, Side};
use ftvm_vmm_core::vm::{buffer_console, RunOutcome, Vm, VmConfig};

/// The `cpu` guest without a single exit from its start to its checksum line (`quiet`): 4,000
/// passes over 16 MiB, 6 to 40 s on this machine (it hashed at 1.7 to 11 GB/s on different
/// days).
const CPU_NO_EXITS: &str = "quiet size=16M rounds=4000";

/// The failure timeout of both sides (the default of `ftvm primary/backup`).
const FAIL_TIMEOUT: Duration = Duration::from_millis(ftvm::pair::DEFAULT_FAIL_TIMEOUT_MS);

/// Runs the `cpu` guest alone in this process (no FT) with `cmdline`; returns its checksum and
/// how long it ran.
fn cpu_alone(cmdline: &str) -> (String, Duration) {
    let (console, out) = buffer_console();
    let cfg = VmConfig {
        mem_size: 64 << 20,
        cmdline: cmdline.into(),
        console,
        ..VmConfig::default()
    };
    let mut vm = Vm::new(&cfg, ftvm_vmm_core::guests::CPU).expect("boot the cpu guest");
    let t = Instant::now();
    assert_eq!(vm.run().expect("run cpu"), RunOutcome::PoweredOff(0));
    let elapsed = t.elapsed();
    let text = String::from_utf8_lossy(&out.lock().expect("console")).into_owned();
    let sum = checksum_of(&text).unwrap_or_else(|| panic!("no checksum line: {text}"));
    // `quiet`: the checksum line (two exits) and the power-off are the only exits.
    assert_eq!(vm.stats().total(), 3, "exits of a quiet cpu guest");
    (sum, elapsed)
}

/// The checksum a `cpu` guest printed.
fn checksum_of(console: &str) -> Option<String> {
    console
        .lines()
        .find_map(|l| l.strip_prefix("cpu: checksum="))
        .map(str::to_string)
}

/// The primary of a guest that computes for seconds without any VM exit is SIGKILLed in the
/// middle of the computation. The backup's vCPU is inside guest code then, with nothing more in
/// its log; its failure detector interrupts it out of `KVM_RUN` (no exit is counted), it wins
/// generation 2 and goes live at exit 0, within the failure timeout plus a small bound — not
/// at the guest's first exit seconds later. The computation finishes on it with the checksum
/// of a run without FT.
#[test]
fn guest_without_exits_fails_over_mid_computation() {
    const TEST: &str = "guest_without_exits_fails_over_mid_computation";
    if common::skip(TEST) {
        return;
    }
    let _serial = common::serial();
    let (checksum, alone) = cpu_alone(CPU_NO_EXITS);
    let bound = FAIL_TIMEOUT + Duration::from_secs(2);
    eprintln!("{TEST}: alone the guest computes for {alone:?}, checksum {checksum}");
    assert!(
        alone > bound + Duration::from_secs(2),
        "the guest computes for {alone:?} only: too short to tell a go-live mid-computation \
         from one at its first exit (raise rounds in CPU_NO_EXITS)"
    );
    let mut config = common::config("noexit");
    config.guest = "cpu".into();
    config.cmdline = Some(CPU_NO_EXITS.into());
    let mut s = Scenario::prepare(config).expect("prepare pair");
    s.backup = Some(s.spawn(Side::Backup, &[]).expect("spawn backup"));
    s.primary = Some(s.spawn(Side::Primary, &[]).expect("spawn primary"));
    let paired = s
        .primary
        .as_mut()
        .expect("primary")
        .wait_line("paired with the backup", Duration::from_secs(30));
    assert!(paired.is_some(), "never paired\n{}", s.stderr_of_both());
    // Into the computation (neither side has made an exit yet).
    std::thread::sleep(Duration::from_millis(500));
    let t_kill = Instant::now();
    s.primary.take().expect("primary").kill();
    let backup = s.backup.as_mut().expect("backup");
    let live = backup.wait_line("LIVE", bound);
    let after = t_kill.elapsed();
    let live = live.unwrap_or_else(|| {
        panic!(
            "the backup did not go live within {bound:?} of the SIGKILL (guest computing without \
             exits)\n{}",
            backup.stderr_text()
        )
    });
    eprintln!("{TEST}: {live} ({after:?} after the SIGKILL)");
    assert!(live.contains("generation 2"), "{live}");
    assert!(live.contains("at exit 0"), "{live}");
    // The computation goes on live and ends with the right result.
    let status = backup.wait_exit(alone * 4 + Duration::from_secs(30));
    assert_eq!(
        status.and_then(|st| st.code()),
        Some(0),
        "{}",
        backup.stderr_text()
    );
    assert_eq!(
        checksum_of(&s.console(Some(Side::Backup))).as_deref(),
        Some(checksum.as_str()),
        "{}",
        s.stderr_of_both()
    );
    assert_eq!(
        s.generations(),
        vec![(1, "primary".to_string()), (2, "backup".to_string())]
    );
}

/// Waits until `kv` (run by `node`) answers PING (panics after `timeout` or if it exits).
fn wait_pong(s: &Scenario, node: &mut Node, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Reply::Simple(r)) = s.command(&[b"PING"], Duration::from_secs(1)) {
            if r == "PONG" {
                return;
            }
        }
        if let Some(st) = node.try_status() {
            panic!("kv exited ({st})\n{}", node.stderr_text());
        }
        assert!(
            Instant::now() < deadline,
            "kv did not answer PING within {timeout:?}\n{}",
            node.stderr_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Own-copy mode (each side writes its own image), the backup's image on a 64 KiB tmpfs: under
/// client load its copy fills up (ENOSPC) while the primary's writes succeed. The backup stops
/// at the first disk write whose result differs from the status the primary logged for it,
/// says so, tells the primary (a GOODBYE frame with reason CannotTakeOver) and exits with
/// `CANNOT_TAKE_OVER` — it never goes live on a disk it knows to be incomplete. The primary
/// wins generation 2, goes on alone and keeps serving without a client error; every
/// acknowledged write reads back, and `kv` booted alone on the primary's image afterwards
/// recovers every one of them.
#[test]
fn backup_whose_disk_copy_fills_stops_and_the_primary_goes_on_alone() {
    const TEST: &str = "backup_whose_disk_copy_fills_stops_and_the_primary_goes_on_alone";
    if common::skip(TEST) || common::skip_without(TEST, "mount", "mount") {
        return;
    }
    let _serial = common::serial();
    // Dropped last: after the scenario's processes, which hold the image open.
    let small = common::SmallFs::mount("64k").expect("mount a small tmpfs");
    let mut s = Scenario::prepare(common::config("fullb")).expect("prepare pair");
    s.place_disk(Side::Backup, small.path())
        .expect("the backup's image on the small tmpfs");
    s.backup = Some(s.spawn(Side::Backup, &[]).expect("spawn backup"));
    s.primary = Some(s.spawn(Side::Primary, &[]).expect("spawn primary"));
    s.wait_ready(Duration::from_secs(30)).expect("kv answers");
    let mut load = common::load(&s, 4, "full");
    // The backup's copy fills up: it must stop, and say why.
    let backup = s.backup.as_mut().expect("backup");
    let status = backup.wait_exit(Duration::from_secs(120));
    let acked_before = load.stats().ops;
    let text = backup.stderr_text();
    assert_eq!(
        status.and_then(|st| st.code()),
        Some(ftvm::exit::CANNOT_TAKE_OVER),
        "the backup did not stop as unable to take over ({acked_before} writes acked)\n{}",
        s.stderr_of_both()
    );
    eprintln!("{TEST}: the backup stopped after {acked_before} acknowledged writes");
    assert!(acked_before > 0, "{text}");
    let why = backup
        .find_line("CANNOT TAKE OVER")
        .unwrap_or_else(|| panic!("no CANNOT TAKE OVER line\n{text}"));
    assert!(why.contains("write of sector"), "{why}");
    assert!(why.contains("No space left on device"), "{why}");
    assert!(why.contains("OK on the primary"), "{why}");
    assert!(!text.contains("LIVE"), "{text}");
    // The primary learned why, went on alone, and serves.
    let primary = s.primary.as_mut().expect("primary");
    let alone = primary
        .wait_line("ALONE", Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no ALONE line\n{}", primary.stderr_text()));
    assert!(alone.contains("generation 2"), "{alone}");
    let left = primary
        .find_line("the backup LEFT the pair")
        .unwrap_or_else(|| panic!("the primary never learned why\n{}", primary.stderr_text()));
    assert!(left.contains("cannot take over"), "{left}");
    eprintln!("{TEST}:\n  {why}\n  {left}\n  {alone}");
    common::wait_ops(&s, &load, 200, Duration::from_secs(20));
    let stats = load.stop();
    assert_eq!(
        stats.errors,
        0,
        "clients saw errors: {:?}",
        load.last_error()
    );
    let served = common::assert_no_acked_write_lost(&s, load.checker());
    assert_eq!(
        s.generations(),
        vec![(1, "primary".to_string()), (2, "primary".to_string())]
    );
    // Every acknowledged write is on the primary's image: kv powered off, then booted alone
    // on that image, recovers them all from its log.
    s.shutdown_guest();
    common::assert_exits_with(s.primary.as_mut().expect("primary"), 0);
    let mut alone = s
        .spawn_alone(&s.disk(Side::Primary))
        .expect("boot kv alone on the primary's image");
    wait_pong(&s, &mut alone, Duration::from_secs(30));
    let recovered = common::assert_no_acked_write_lost(&s, load.checker());
    assert_eq!(recovered.checked, served.checked, "{recovered:?}");
    s.shutdown_guest();
    alone.wait_exit(Duration::from_secs(15));
    drop(s);
    drop(small);
}
