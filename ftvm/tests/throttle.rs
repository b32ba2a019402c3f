//! The primary's CPU throttle in `ftvm primary`: a real pair (cpu guest, TCP on loopback) with
//! `--report`; the report's `"throttle"` object carries the flags' target and minimum share
//! and the final controller state, or says why there was no throttle. Needs root and /dev/kvm
//! (prints SKIP otherwise).

use std::path::Path;
use std::process::{Command, Stdio};

use ftvm_vmm_core::ft::throttle::cgroup_cpu_unusable;

const BIN: &str = env!("CARGO_BIN_EXE_ftvm");

/// Why the test cannot run here, if it cannot.
fn missing() -> Option<String> {
    ftvm::scenario::missing()
}

/// Runs a cpu-guest pair on a free loopback port with `extra` primary flags; returns the
/// primary's report.
fn run_pair(dir: &Path, extra: &[&str]) -> serde_json::Value {
    let [port] = ftvm_vmm_core::testing::loopback_ports().expect("free loopback port");
    let peer = format!("127.0.0.1:{port}");
    let backup = Command::new(BIN)
        .args([
            "backup",
            "--guest",
            "cpu",
            "--transport",
            "tcp",
            "--peer",
            &peer,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn backup");
    let report = dir.join("primary.json");
    let primary = Command::new(BIN)
        .args([
            "primary",
            "--guest",
            "cpu",
            "--transport",
            "tcp",
            "--peer",
            &peer,
        ])
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

/// With the flags, the report shows a running throttle with that target and a minimum share
/// no lower than the flag's; without a usable cgroup, it says why (and the pair still ran).
#[test]
fn primary_report_has_the_throttle_state() {
    const TEST: &str = "primary_report_has_the_throttle_state";
    if ftvm_vmm_core::testing::skip::if_missing(TEST, missing()) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let r = run_pair(
        dir.path(),
        &["--throttle-target-ms", "250", "--throttle-min-share", "0.3"],
    );
    let t = &r["throttle"];
    match cgroup_cpu_unusable() {
        None => {
            assert_eq!(t["enabled"], true, "{t}");
            assert_eq!(t["target_ms"].as_f64(), Some(250.0), "{t}");
            let min = t["min_share"].as_f64().expect("min_share");
            let share = t["share"].as_f64().expect("share");
            assert!((0.3 - 1e-9..=1.0).contains(&min), "{t}");
            assert!(share >= min && share <= 1.0, "{t}");
            assert!(t["lag_ms"].as_f64().is_some_and(|l| l >= 0.0), "{t}");
            assert!(t["throttled_ms"].as_f64().is_some_and(|l| l >= 0.0), "{t}");
            assert!(t["updates"].as_u64().is_some(), "{t}");
        }
        Some(why) => {
            eprintln!("{TEST}: no cgroup cpu controller ({why}): checking the fallback");
            assert_eq!(t["enabled"], false, "{t}");
            assert!(
                t["reason"]
                    .as_str()
                    .is_some_and(|s| s.contains("could not start")),
                "{t}"
            );
        }
    }
}

/// `--throttle-target-ms 0` turns the throttle off, and the report says so.
#[test]
fn throttle_target_zero_turns_it_off() {
    const TEST: &str = "throttle_target_zero_turns_it_off";
    if ftvm_vmm_core::testing::skip::if_missing(TEST, missing()) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let r = run_pair(dir.path(), &["--throttle-target-ms", "0"]);
    assert_eq!(r["throttle"]["enabled"], false, "{r}");
    assert!(
        r["throttle"]["reason"]
            .as_str()
            .is_some_and(|s| s.starts_with("off")),
        "{r}"
    );
    assert_eq!(r["code"], 0, "{r}");
}
