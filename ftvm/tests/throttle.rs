//! The primary's CPU throttle in `ftvm primary`: a real pair (TCP on loopback) with `--report`;
//! the report's `"throttle"` object carries the flags' target and the controller's state, or
//! says why there was no throttle. With the backup process held to 20 % of a CPU by a cgroup,
//! the report must show that the primary was throttled (its share went below 1, never below
//! the flag's minimum). Needs root and /dev/kvm (prints SKIP otherwise).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use ftvm_vmm_core::ft::throttle::experiment::logging_guest;
use ftvm_vmm_core::ft::throttle::{cgroup_cpu_unusable, CgroupCpu};
use ftvm_vmm_core::testing::skip;

const BIN: &str = env!("CARGO_BIN_EXE_ftvm");

/// Why the test cannot run here, if it cannot.
fn missing() -> Option<String> {
    ftvm::scenario::missing()
}

/// Runs a pair of `guest` (an embedded name or an ELF path) on a free loopback port with
/// `extra` primary flags; the backup process runs in `backup_group` when given (it moves
/// itself in before it execs `ftvm`, so every thread it starts is limited). Returns the
/// primary's report.
fn run_pair(
    dir: &Path,
    guest: &str,
    extra: &[&str],
    backup_group: Option<&CgroupCpu>,
) -> serde_json::Value {
    let [port] = ftvm_vmm_core::testing::loopback_ports().expect("free loopback port");
    let peer = format!("127.0.0.1:{port}");
    let side = |role| {
        [
            role,
            "--guest",
            guest,
            "--transport",
            "tcp",
            "--peer",
            &peer,
        ]
    };
    let backup_args = side("backup");
    let mut backup = match backup_group {
        Some(g) => {
            let mut c = Command::new("sh");
            c.args([
                "-c",
                r#"echo $$ > "$FTVM_TEST_TASKS" && exec "$@""#,
                "sh",
                BIN,
            ])
            .args(backup_args)
            .env("FTVM_TEST_TASKS", g.path().join("tasks"));
            c
        }
        None => {
            let mut c = Command::new(BIN);
            c.args(backup_args);
            c
        }
    };
    let backup = backup
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn backup");
    let report = dir.join("primary.json");
    let primary = Command::new(BIN)
        .args(side("primary"))
        .arg("--report")
        .arg(&report)
        .args(extra)
        .stdout(Stdio::null())
        .output()
        .expect("run primary");
    let b = backup.wait_with_output().expect("backup");
    assert!(
        primary.status.success(),
        "primary: {}",
        String::from_utf8_lossy(&primary.stderr)
    );
    assert!(
        b.status.success(),
        "backup: {}",
        String::from_utf8_lossy(&b.stderr)
    );
    let text = std::fs::read_to_string(&report).expect("primary report");
    serde_json::from_str(&text).expect("report is JSON")
}

/// With the flags and a backup held to 20 % of a CPU, the report shows a throttle with that
/// target that lowered the primary's share (below 1, not below the flag's 0.3) for a while;
/// without a usable cgroup, it says why (and the pair still ran), and the throttling itself
/// is a loud SKIP.
#[test]
fn primary_report_has_the_throttle_state() {
    const TEST: &str = "primary_report_has_the_throttle_state";
    if skip::if_missing(TEST, missing()) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    // A guest that logs a clock read every ~20 µs of arithmetic for 3 s (its own clock).
    let guest = dir.path().join("logging.elf");
    std::fs::write(&guest, logging_guest(Duration::from_secs(3), 20_000)).expect("guest ELF");
    let guest = guest.to_str().expect("utf-8 path");
    let flags = ["--throttle-target-ms", "250", "--throttle-min-share", "0.3"];
    match cgroup_cpu_unusable() {
        None => {
            let name = format!("ftvm-test-slow-backup-{}", std::process::id());
            let mut slow = CgroupCpu::create(&name, Duration::from_millis(10)).expect("cgroup");
            slow.set_share(0.2).expect("quota");
            let r = run_pair(dir.path(), guest, &flags, Some(&slow));
            let t = &r["throttle"];
            eprintln!("{TEST}: {t}");
            assert_eq!(t["enabled"], true, "{t}");
            assert_eq!(t["target_ms"].as_f64(), Some(250.0), "{t}");
            let min = t["min_share"].as_f64().expect("min_share");
            // Throttled while the backup was slowed, never below the flag's floor...
            assert!((0.3 - 1e-9..0.95).contains(&min), "not throttled: {t}");
            let throttled = t["throttled_ms"].as_f64().expect("throttled_ms");
            assert!(throttled >= 100.0, "throttled for {throttled} ms: {t}");
            assert!(t["max_lag_ms"].as_f64().is_some_and(|l| l > 0.0), "{t}");
            assert!(t["updates"].as_u64().is_some_and(|n| n > 0), "{t}");
            // ...and back at full share when it stopped.
            assert_eq!(t["share"].as_f64(), Some(1.0), "{t}");
            assert_eq!(r["code"], 0, "{r}");
        }
        Some(why) => {
            let r = run_pair(dir.path(), guest, &flags, None);
            let t = &r["throttle"];
            assert_eq!(t["enabled"], false, "{t}");
            assert!(
                t["reason"]
                    .as_str()
                    .is_some_and(|s| s.contains("could not start")),
                "{t}"
            );
            skip::skip(
                TEST,
                format_args!("no cgroup cpu controller to slow the backup with ({why})"),
            );
        }
    }
}

/// `--throttle-target-ms 0` turns the throttle off, and the report says so.
#[test]
fn throttle_target_zero_turns_it_off() {
    const TEST: &str = "throttle_target_zero_turns_it_off";
    if skip::if_missing(TEST, missing()) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let r = run_pair(dir.path(), "cpu", &["--throttle-target-ms", "0"], None);
    assert_eq!(r["throttle"]["enabled"], false, "{r}");
    assert!(
        r["throttle"]["reason"]
            .as_str()
            .is_some_and(|s| s.starts_with("off")),
        "{r}"
    );
    assert_eq!(r["code"], 0, "{r}");
}
