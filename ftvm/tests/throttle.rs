//! The primary's CPU throttle in `ftvm primary`: a real pair (cpu guest, TCP on loopback) with
//! `--report`; the report's `"throttle"` object carries the flags' target and minimum share,
//! the actuator that ran (`cgroup-v2`, `cgroup-v1` or `pacer`) and the final controller state,
//! or says why there was no throttle. A pair started with `ip netns exec` (which hides the
//! host's cgroup mounts) is throttled through the cgroup all the same. Needs root and /dev/kvm
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
    run_pair_with(dir, extra, &format!("127.0.0.1:{port}"), |_| {})
}

/// [`run_pair`] with the peer address given and the two commands adjusted by `wrap` (which
/// gets each `Command` before its arguments are added).
fn run_pair_with(
    dir: &Path,
    extra: &[&str],
    peer: &str,
    wrap: impl Fn(&mut Command),
) -> serde_json::Value {
    let peer = peer.to_string();
    let command = || {
        let mut c = Command::new(BIN);
        wrap(&mut c);
        c
    };
    let backup = command()
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
    let primary = command()
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
    if let Some(r) = missing() {
        eprintln!("SKIP {TEST}: {r}");
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
            assert_eq!(t["enabled"], true, "{t}");
            assert_eq!(t["actuator"], "pacer", "{t}");
        }
    }
    let want = match cgroup_cpu_unusable() {
        None => ["cgroup-v1", "cgroup-v2"].as_slice(),
        Some(_) => ["pacer"].as_slice(),
    };
    assert!(
        t["actuator"].as_str().is_some_and(|a| want.contains(&a)),
        "{t}"
    );
}

/// `--throttle-cgroup none`: the pacer alone, reported as such.
#[test]
fn throttle_cgroup_none_paces_alone() {
    const TEST: &str = "throttle_cgroup_none_paces_alone";
    if let Some(r) = missing() {
        eprintln!("SKIP {TEST}: {r}");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let r = run_pair(dir.path(), &["--throttle-cgroup", "none"]);
    assert_eq!(r["throttle"]["enabled"], true, "{r}");
    assert_eq!(r["throttle"]["actuator"], "pacer", "{r}");
}

/// Started with `ip netns exec` (a private mount namespace whose fresh `/sys` shows no cgroup
/// mount), the primary mounts the cpu controller's hierarchy in its own namespace and is
/// throttled through a cgroup, as outside; the host's mounts are untouched and no group is
/// left behind.
#[test]
fn primary_under_ip_netns_exec_uses_a_cgroup() {
    const TEST: &str = "primary_under_ip_netns_exec_uses_a_cgroup";
    if let Some(r) = missing().or_else(cgroup_cpu_unusable) {
        eprintln!("SKIP {TEST}: {r}");
        return;
    }
    let ns = ftvm_channel::netns::Netns::create(&format!("ftvm-thr-{}", std::process::id()))
        .expect("netns");
    let mounts = || std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let before = mounts();
    let dir = tempfile::tempdir().expect("tempdir");
    let name = ns.name().to_string();
    let r = run_pair_with(dir.path(), &[], "127.0.0.1:7000", |c| {
        *c = Command::new("ip");
        c.args(["netns", "exec", &name, BIN]);
    });
    let t = &r["throttle"];
    assert_eq!(t["enabled"], true, "{t}");
    assert!(
        t["actuator"]
            .as_str()
            .is_some_and(|a| a.starts_with("cgroup-")),
        "not throttled through a cgroup under ip netns exec: {t}"
    );
    assert_eq!(mounts(), before, "the host's mounts changed");
    let h = ftvm_vmm_core::ft::throttle::CpuHierarchy::find().expect("hierarchy");
    let left: Vec<_> = std::fs::read_dir(&h.parent)
        .expect("cgroup dir")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("-primary-"))
        .collect();
    assert!(left.is_empty(), "groups left behind: {left:?}");
}

/// `--throttle-target-ms 0` turns the throttle off, and the report says so.
#[test]
fn throttle_target_zero_turns_it_off() {
    const TEST: &str = "throttle_target_zero_turns_it_off";
    if let Some(r) = missing() {
        eprintln!("SKIP {TEST}: {r}");
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
