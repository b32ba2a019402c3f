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

use ftvm::scenario::{Scenario, Side};
use ftvm_vmm_core::vm::{buffer_console, RunOutcome, Vm, VmConfig};

/// The `cpu` guest without a single exit from its start to its checksum line (`quiet`), for
/// about ten seconds on this machine (3,000 passes over 16 MiB at ~4.5 GB/s).
const CPU_NO_EXITS: &str = "quiet size=16M rounds=3000";

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
    let bound = FAIL_TIMEOUT + Duration::from_secs(3);
    eprintln!("{TEST}: alone the guest computes for {alone:?}, checksum {checksum}");
    assert!(
        alone > bound + Duration::from_secs(3),
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
    // Well into the computation (neither side has made an exit yet).
    std::thread::sleep(Duration::from_secs(1));
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
