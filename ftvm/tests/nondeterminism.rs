//! Guests with an input nobody logged, as real processes: the `nondet` guest executes RDRAND (or
//! RDTSC) once and prints the value every 100 ms on its console, under the output rule. On hosts
//! that cannot trap these instructions (this one: PVM, AMD) the primary and the backup each get
//! their own value. Output-verified replay must catch it at the first line: the backup reports
//! `diverged at exit N: output …`, stops with status 202 and never goes live — not even after the
//! primary is SIGKILLed — and the primary treats it as a failed backup (goes on alone). And
//! `ftvm run --check-determinism` reports `nondet` nondeterministic and `cpu` deterministic.
//!
//! Needs /dev/kvm (prints SKIP otherwise; also where the host traps the instruction, since the
//! guest then cannot get an unlogged value). `FTVM_BIN=/path/to/ftvm` runs the scenarios against
//! another build of `ftvm` (the guest is handed over as an ELF file, so an older build runs it
//! too): that is how the defect was shown on the code before output verification.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ftvm::scenario::Node;

/// The `ftvm` under test: `FTVM_BIN` if set, else the one built with these tests.
fn ftvm_bin() -> PathBuf {
    std::env::var_os("FTVM_BIN").map_or_else(common::ftvm_bin, PathBuf::from)
}

/// Writes the embedded `nondet` guest to `dir` and returns its path.
fn nondet_elf(dir: &Path) -> PathBuf {
    let elf = ftvm_vmm_core::guests::by_name("nondet").expect("nondet guest embedded");
    let path = dir.join("nondet.elf");
    std::fs::write(&path, elf).expect("write nondet.elf");
    path
}

/// Starts `ftvm <args>` with stderr collected.
fn ftvm(args: &[String]) -> Node {
    let mut cmd = Command::new(ftvm_bin());
    cmd.args(args);
    Node::start(None, &mut cmd).expect("start ftvm")
}

/// `Some(reason)` when this test cannot run here: no KVM, or the host traps `insn` (the guest
/// faults instead of getting a value nobody logged).
fn skip_reason(elf: &Path, insn: &str) -> Option<String> {
    if let Some(r) = ftvm_testkit::kvm_missing() {
        return Some(r);
    }
    let mut probe = ftvm(&[
        "run".into(),
        "--guest".into(),
        elf.display().to_string(),
        "--mem".into(),
        "16M".into(),
        "--cmdline".into(),
        format!("insn={insn} count=1 period_ms=1"),
        "--quiet".into(),
    ]);
    let status = probe.wait_exit(Duration::from_secs(30));
    match status.and_then(|s| s.code()) {
        Some(0) => None,
        _ => Some(format!(
            "the guest could not execute {insn} here (the host traps it, so it cannot escape logging): {}",
            probe.stderr_text()
        )),
    }
}

/// The values of the `nondet: <insn>=<hex>` lines of a console file.
fn printed(path: &Path, insn: &str) -> Vec<String> {
    let prefix = format!("nondet: {insn}=");
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix).map(str::to_string))
        .collect()
}

/// The pair scenario of the module docs for `insn`.
fn pair_never_goes_live_with_another_value(test: &str, insn: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let elf = nondet_elf(dir.path());
    if ftvm_testkit::skip::if_missing(test, skip_reason(&elf, insn)) {
        return;
    }
    let _serial = common::serial();
    let [log, hb_p, hb_b] = ftvm_testkit::loopback_ports::<3>().expect("ports");
    let arbiter = dir.path().join("arbiter");
    std::fs::create_dir(&arbiter).expect("arbiter dir");
    let side = |role: &str, me: u16, peer: u16| -> Vec<String> {
        let tag = &role[..1];
        [
            role,
            "--guest",
            &elf.display().to_string(),
            "--mem",
            "16M",
            "--cmdline",
            &format!("insn={insn} period_ms=100"),
            "--peer",
            &format!("127.0.0.1:{log}"),
            "--transport",
            "tcp",
            "--arbiter",
            &format!("file:{}", arbiter.display()),
            "--node",
            role,
            "--heartbeat",
            &format!("127.0.0.1:{me}"),
            "--peer-heartbeat",
            &format!("127.0.0.1:{peer}"),
            "--console",
            &dir.path()
                .join(format!("{tag}.console"))
                .display()
                .to_string(),
            "--report",
            &dir.path().join(format!("{tag}.json")).display().to_string(),
            "--log",
            "info",
        ]
        .map(String::from)
        .to_vec()
    };
    let mut backup = ftvm(&side("backup", hb_b, hb_p));
    // The throttle is the primary's (a backup refuses the flag).
    let mut primary_args = side("primary", hb_p, hb_b);
    primary_args.extend(["--throttle-target-ms".to_string(), "0".to_string()]);
    let mut primary = ftvm(&primary_args);
    let p_console = dir.path().join("p.console");
    let b_console = dir.path().join("b.console");

    // The primary's console is released under the output rule: 3 lines seen by the world.
    let deadline = Instant::now() + Duration::from_secs(30);
    let seen = loop {
        let v = printed(&p_console, insn);
        if v.len() >= 3 {
            break v;
        }
        assert!(
            Instant::now() < deadline && primary.try_status().is_none(),
            "the primary printed {v:?} in 30 s\n--- primary ---\n{}\n--- backup ---\n{}",
            primary.stderr_text(),
            backup.stderr_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(seen.iter().all(|v| *v == seen[0]), "{seen:?}");
    // A backup that checks its outputs has stopped at the first line already; give it a moment.
    let stopped_before_kill = backup.wait_exit(Duration::from_secs(5)).is_some();
    let alone = stopped_before_kill
        .then(|| primary.wait_line("ALONE", Duration::from_secs(10)))
        .flatten();
    primary.kill();
    // Whatever the backup does now: go live, or stay stopped.
    let went_live = backup.wait_line("LIVE", Duration::from_secs(5));
    if went_live.is_some() {
        // Let a live backup print a few lines of its own.
        std::thread::sleep(Duration::from_millis(500));
    }
    let status = backup.kill();
    let released_by_backup = if went_live.is_some() {
        printed(&b_console, insn)
    } else {
        Vec::new()
    };
    let stderr = backup.stderr_text();
    eprintln!("{test}: the primary printed {}; backup:\n{stderr}", seen[0]);
    assert!(
        released_by_backup.iter().all(|v| *v == seen[0]),
        "after the primary was SIGKILLed the backup went live and printed {released_by_backup:?}, \
         while clients saw {} from the primary: a silent divergence\n{stderr}",
        seen[0]
    );
    assert!(
        went_live.is_none(),
        "a backup whose outputs differ went live: {went_live:?}\n{stderr}"
    );
    let diverged = stderr
        .lines()
        .find(|l| l.contains("diverged at exit") && l.contains(": output of the console differs"));
    assert!(
        diverged.is_some(),
        "no `diverged at exit N: output …` line:\n{stderr}"
    );
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(ftvm::exit::DIVERGED),
        "{stderr}"
    );
    assert!(
        stderr.contains("can no longer take over"),
        "the backup must say it cannot take over:\n{stderr}"
    );
    assert!(
        stopped_before_kill,
        "the backup kept running after its first differing output"
    );
    let alone = alone.unwrap_or_else(|| {
        panic!(
            "the primary did not go on alone after its backup diverged:\n{}",
            primary.stderr_text()
        )
    });
    assert!(alone.contains("generation 2"), "{alone}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("b.json")).expect("report"))
            .expect("json");
    assert_eq!(report["output_mismatches"], 1, "{report}");
    assert!(
        report["diverged"]
            .as_str()
            .is_some_and(|d| d.contains("output")),
        "{report}"
    );
}

/// RDRAND read once and printed every 100 ms: the backup's first differing line stops it
/// (`diverged at exit N: output of the console differs …`, status 202), the primary goes on
/// alone, and after the primary is SIGKILLed the backup is not there to go live with another
/// value.
#[test]
fn rdrand_guest_backup_diverges_on_output_and_never_goes_live() {
    pair_never_goes_live_with_another_value(
        "rdrand_guest_backup_diverges_on_output_and_never_goes_live",
        "rdrand",
    );
}

/// The same with RDTSC (not trapped at CPL3 where the host does not enforce CR4.TSD).
#[test]
fn rdtsc_guest_backup_diverges_on_output_and_never_goes_live() {
    pair_never_goes_live_with_another_value(
        "rdtsc_guest_backup_diverges_on_output_and_never_goes_live",
        "rdtsc",
    );
}

/// Runs `ftvm run --check-determinism` with `args`; returns its exit status and stderr.
fn check_determinism(args: &[String]) -> (Option<i32>, String) {
    let mut v: Vec<String> = vec!["run".into(), "--check-determinism".into(), "--quiet".into()];
    v.extend_from_slice(args);
    let mut node = ftvm(&v);
    let status = node.wait_exit(Duration::from_secs(60));
    (status.and_then(|s| s.code()), node.stderr_text())
}

/// `ftvm run --check-determinism`: the `nondet` guest (RDRAND) is reported nondeterministic
/// (status 208, the first differing output named), `cpu` (which reads the clock, a logged input)
/// deterministic (its own status, 0), and `kv` on a disk without a network deterministic too
/// (its own status, 3: no network device), its disk compared after both runs and the second
/// run's copy of the image removed.
#[test]
fn check_determinism_tells_nondet_from_cpu() {
    const TEST: &str = "check_determinism_tells_nondet_from_cpu";
    let dir = tempfile::tempdir().expect("tempdir");
    let elf = nondet_elf(dir.path());
    if ftvm_testkit::skip::if_missing(TEST, skip_reason(&elf, "rdrand")) {
        return;
    }
    let _serial = common::serial();
    let s = |v: &[&str]| v.iter().map(|a| a.to_string()).collect::<Vec<_>>();

    let (status, err) = check_determinism(&s(&[
        "--guest",
        &elf.display().to_string(),
        "--mem",
        "16M",
        "--cmdline",
        "insn=rdrand count=3 period_ms=5",
    ]));
    assert_eq!(status, Some(ftvm::exit::NONDETERMINISTIC), "{err}");
    assert!(err.contains("result     NONDETERMINISTIC"), "{err}");
    assert!(
        err.contains("at exit 1: output of the console differs"),
        "{err}"
    );
    assert!(err.contains("memory     DIFFER"), "{err}");

    let (status, err) = check_determinism(&s(&[
        "--guest",
        "cpu",
        "--mem",
        "16M",
        "--cmdline",
        "size=256k rounds=4 timing",
    ]));
    assert_eq!(status, Some(0), "{err}");
    assert!(err.contains("result     DETERMINISTIC"), "{err}");
    assert!(err.contains("outputs    equal (3 digests"), "{err}");

    let disk = dir.path().join("kv.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(8 << 20))
        .expect("disk");
    let (status, err) = check_determinism(&s(&[
        "--guest",
        "kv",
        "--mem",
        "16M",
        "--disk",
        &disk.display().to_string(),
    ]));
    assert_eq!(status, Some(3), "{err}");
    assert!(err.contains("result     DETERMINISTIC"), "{err}");
    assert!(err.contains("disk       equal (0x"), "{err}");
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .expect("dir")
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n.to_string_lossy().contains(".check-"))
        .collect();
    assert!(left.is_empty(), "disk copies left behind: {left:?}");
}
