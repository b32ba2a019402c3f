//! The primary's CPU throttle in `ftvm primary`: a real pair (TCP on loopback) with `--report`;
//! the report's `"throttle"` object carries the flags' target and minimum share, the actuator
//! that ran (`cgroup-v2`, `cgroup-v1` or `pacer`) and the controller's state, or says why there
//! was no throttle. With the backup process held to 20 % of a CPU by a cgroup, the report must
//! show that the primary was throttled (its share went below 1, never below the flag's
//! minimum). A pair started with `ip netns exec` (which hides the host's cgroup mounts) is
//! throttled through the cgroup all the same. Needs root and /dev/kvm (prints SKIP otherwise).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use ftvm_ft::throttle::{cgroup_cpu_unusable, CgroupCpu};
use ftvm_testkit::experiment::logging_guest;
use ftvm_testkit::skip;

const BIN: &str = env!("CARGO_BIN_EXE_ftvm");

/// Why the test cannot run here, if it cannot.
fn missing() -> Option<String> {
    ftvm::scenario::missing()
}

/// Runs a pair of `guest` (an embedded name or an ELF path) on a free loopback port with
/// `extra` primary flags; returns the primary's report.
fn run_pair(dir: &Path, guest: &str, extra: &[&str]) -> serde_json::Value {
    let [port] = ftvm_testkit::loopback_ports().expect("free loopback port");
    run_pair_with(
        dir,
        guest,
        extra,
        &format!("127.0.0.1:{port}"),
        None,
        |_| {},
    )
}

/// [`run_pair`] with the peer address given, the backup process in `backup_group` when given
/// (it moves itself in before it execs `ftvm`, so every thread it starts is limited), and both
/// commands adjusted by `wrap` (which gets each `Command` before its arguments are added).
fn run_pair_with(
    dir: &Path,
    guest: &str,
    extra: &[&str],
    peer: &str,
    backup_group: Option<&CgroupCpu>,
    wrap: impl Fn(&mut Command),
) -> serde_json::Value {
    let side = |role| [role, "--guest", guest, "--transport", "tcp", "--peer", peer];
    let command = || {
        let mut c = Command::new(BIN);
        wrap(&mut c);
        c
    };
    let mut backup = match backup_group {
        Some(g) => {
            let mut c = Command::new("sh");
            c.args([
                "-c",
                r#"echo $$ > "$FTVM_TEST_TASKS" && exec "$@""#,
                "sh",
                BIN,
            ])
            .env("FTVM_TEST_TASKS", g.path().join("tasks"));
            c
        }
        None => command(),
    };
    let backup = backup
        .args(side("backup"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn backup");
    let report = dir.join("primary.json");
    let primary = command()
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
/// target, run through a cgroup, that lowered the primary's share (below 1, not below the
/// flag's 0.3) for a while; without a usable cgroup, the pacer alone runs (and the pair still
/// ran), and the throttling itself is a loud SKIP (nothing to slow the backup with).
#[test]
fn primary_report_has_the_throttle_state() {
    const TEST: &str = "primary_report_has_the_throttle_state";
    if skip::if_missing(TEST, missing()) {
        return;
    }
    // Pairs that measure CPU shares: one at a time in this binary.
    let _one = ftvm_testkit::one_at_a_time();
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
            let [port] = ftvm_testkit::loopback_ports().expect("free loopback port");
            let peer = format!("127.0.0.1:{port}");
            let r = run_pair_with(dir.path(), guest, &flags, &peer, Some(&slow), |_| {});
            let t = &r["throttle"];
            eprintln!("{TEST}: {t}");
            assert_eq!(t["enabled"], true, "{t}");
            assert!(
                t["actuator"]
                    .as_str()
                    .is_some_and(|a| ["cgroup-v1", "cgroup-v2"].contains(&a)),
                "{t}"
            );
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
            let r = run_pair(dir.path(), guest, &flags);
            let t = &r["throttle"];
            assert_eq!(t["enabled"], true, "{t}");
            assert_eq!(t["actuator"], "pacer", "{t}");
            skip::skip(
                TEST,
                format_args!("no cgroup cpu controller to slow the backup with ({why})"),
            );
        }
    }
}

/// `--throttle-cgroup none`: the pacer alone, reported as such.
#[test]
fn throttle_cgroup_none_paces_alone() {
    const TEST: &str = "throttle_cgroup_none_paces_alone";
    if skip::if_missing(TEST, missing()) {
        return;
    }
    // Pairs that measure CPU shares: one at a time in this binary.
    let _one = ftvm_testkit::one_at_a_time();
    let dir = tempfile::tempdir().expect("tempdir");
    let r = run_pair(dir.path(), "cpu", &["--throttle-cgroup", "none"]);
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
    if skip::if_missing(TEST, missing().or_else(cgroup_cpu_unusable)) {
        return;
    }
    // Pairs that measure CPU shares: one at a time in this binary.
    let _one = ftvm_testkit::one_at_a_time();
    let ns = ftvm_channel::netns::Netns::create(&format!("ftvm-thr-{}", std::process::id()))
        .expect("netns");
    let mounts = || std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let before = mounts();
    let dir = tempfile::tempdir().expect("tempdir");
    let name = ns.name().to_string();
    let r = run_pair_with(dir.path(), "cpu", &[], "127.0.0.1:7000", None, |c| {
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
    let h = ftvm_ft::throttle::CpuHierarchy::find().expect("hierarchy");
    // A primary's group is `ftvm-<pid>-primary-<n>`: one whose process is gone was left
    // behind (groups of live primaries, e.g. another suite's, are theirs to remove).
    let left: Vec<_> = std::fs::read_dir(&h.parent)
        .expect("cgroup dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| {
            let pid = name
                .strip_prefix("ftvm-")
                .and_then(|rest| rest.split_once("-primary-"))
                .map(|(pid, _)| pid);
            pid.is_some_and(|pid| !Path::new("/proc").join(pid).exists())
        })
        .collect();
    assert!(left.is_empty(), "groups left behind: {left:?}");
}

/// `--throttle-target-ms 0` turns the throttle off, and the report says so.
#[test]
fn throttle_target_zero_turns_it_off() {
    const TEST: &str = "throttle_target_zero_turns_it_off";
    if skip::if_missing(TEST, missing()) {
        return;
    }
    // Pairs that measure CPU shares: one at a time in this binary.
    let _one = ftvm_testkit::one_at_a_time();
    let dir = tempfile::tempdir().expect("tempdir");
    let r = run_pair(dir.path(), "cpu", &["--throttle-target-ms", "0"]);
    assert_eq!(r["throttle"]["enabled"], false, "{r}");
    assert!(
        r["throttle"]["reason"]
            .as_str()
            .is_some_and(|s| s.starts_with("off")),
        "{r}"
    );
    assert_eq!(r["code"], 0, "{r}");
}
